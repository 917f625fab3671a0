"""Selective state-space scans (Mamba's S6): a step-by-step reference, a parallel associative scan, and Triton
kernels (`effarch.ops.scan.triton`, imported on first use so the package never needs Triton)."""

from effarch.ops.scan.parallel import linear_scan, selective_scan_parallel
from effarch.ops.scan.reference import selective_scan_reference
from effarch.ops.scan.selective_scan import BACKENDS, selective_scan

__all__ = ["selective_scan", "selective_scan_reference", "selective_scan_parallel", "linear_scan", "BACKENDS"]
