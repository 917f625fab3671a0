"""ModelConfig: one validated dataclass describes any mix of mixers and FFNs, with a layer-pattern grammar.

Layer patterns: names separated by spaces, parenthesised groups and `*N` repetition, e.g.
`"(gdn gdn gdn attn)*4"` or `"(a b)*3 c"`. A name is a registered mixer or a variant defined in
`mixers`: `mixers={"swa": {"type": "attn", "window": 512}, "attn": {"n_heads": 4}}` sets options by
name, and a `type` key makes a new name for a registered mixer with those options.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from effarch import registry

_TOKEN = re.compile(r"\s*(?:(\()|(\))|(\*\s*\d+)|([A-Za-z_][\w\-.]*)|(\S))")


def parse_pattern(pattern: str, field_name: str = "layers") -> list[str]:
    """Expand a layer pattern such as `"(a b)*3 c"` into a list of names."""

    def fail(why: str):
        raise ValueError(f"{field_name}={pattern!r} is not a valid layer pattern: {why}")

    stack: list[list[str]] = [[]]
    last: list[str] | None = None  # the item a following `*N` repeats
    pos = 0
    while pos < len(pattern):
        m = _TOKEN.match(pattern, pos)
        if m is None or m.end() == pos:
            break
        pos = m.end()
        open_, close, star, name, bad = m.groups()
        if bad:
            fail(f"unexpected {bad!r} (use names, parentheses and *N)")
        if open_:
            stack.append([])
            last = None
        elif close:
            if len(stack) == 1:
                fail("unmatched ')'")
            group = stack.pop()
            if not group:
                fail("empty group '()'")
            stack[-1].extend(group)
            last = group
        elif star:
            n = int(star[1:].strip())
            if last is None:
                fail("'*N' must follow a name or a group")
            if n < 1:
                fail("repeat counts must be at least 1")
            stack[-1].extend(last * (n - 1))
            last = None
        else:
            stack[-1].append(name)
            last = [name]
    if len(stack) != 1:
        fail("unmatched '('")
    if not stack[0]:
        fail("no layers")
    return stack[0]


def _check_options(kind: str, type_name: str, label: str, opts: dict) -> None:
    entry = registry.get(kind, type_name)
    accepted = registry.constructor_options(entry.obj)
    unknown = sorted(set(opts) - set(accepted))
    if unknown:
        raise ValueError(
            f"{label}: {kind} {type_name!r} has no option {unknown[0]!r}; its options are: {', '.join(accepted) or 'none'}"
        )


@dataclass
class ModelConfig:
    """Everything needed to build a model; round-trips through JSON (`to_json` / `from_json`)."""

    vocab_size: int = 260
    d_model: int = 256
    layers: str = "attn*4"
    mixers: dict[str, dict[str, Any]] = field(default_factory=dict)
    ffn: str = "swiglu"  # a registered FFN, or "none" for sequence-mixer-only models
    ffn_options: dict[str, Any] = field(default_factory=dict)
    ffn_layers: str | None = None  # optional per-layer FFN pattern, same length as `layers`
    causal: bool = True
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    max_seq_len: int = 2048  # the context the model is meant for (rotary needs no table)
    name: str = ""

    def __post_init__(self) -> None:
        for f, lo in (("vocab_size", 2), ("d_model", 1), ("max_seq_len", 1)):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{f}={v!r} is invalid: it must be an integer of at least {lo}")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise ValueError(f"norm_eps={self.norm_eps!r} is invalid: it must be a positive number")
        if not isinstance(self.mixers, dict) or not all(isinstance(v, dict) for v in self.mixers.values()):
            raise ValueError("mixers must map a layer name to a dict of options, e.g. {'attn': {'n_heads': 4}}")
        known = set(registry.list_mixers())
        for name in self.layer_names:
            if name not in known and "type" not in self.mixers.get(name, {}):
                raise ValueError(
                    f"layers={self.layers!r} names unknown mixer {name!r}; registered mixers are: "
                    f"{', '.join(sorted(known))} (or define it in mixers with a 'type')"
                )
        for name, opts in self.mixers.items():
            type_name = opts.get("type", name)
            if type_name not in known:
                raise ValueError(
                    f"mixers[{name!r}] has type {type_name!r}, which is not a registered mixer; registered mixers are: "
                    f"{', '.join(sorted(known))}"
                )
            _check_options("mixer", type_name, f"mixers[{name!r}]", {k: v for k, v in opts.items() if k != "type"})
        ffns = self.ffn_names
        if len(ffns) != len(self.layer_names):
            raise ValueError(
                f"ffn_layers={self.ffn_layers!r} gives {len(ffns)} FFNs for {len(self.layer_names)} layers; they must match"
            )
        valid_ffns = set(registry.list_ffns()) | {"none"}
        for f in set(ffns):
            if f not in valid_ffns:
                raise ValueError(f"ffn {f!r} is not registered; valid FFNs are: {', '.join(sorted(valid_ffns))}")
            if f != "none":
                _check_options("ffn", f, "ffn_options", self.ffn_options)
        self._check_dimensions()

    # ---- derived views -------------------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        return parse_pattern(self.layers, "layers")

    @property
    def n_layers(self) -> int:
        return len(self.layer_names)

    @property
    def ffn_names(self) -> list[str]:
        if self.ffn_layers is None:
            return [self.ffn] * self.n_layers
        return parse_pattern(self.ffn_layers, "ffn_layers")

    def mixer_spec(self, name: str) -> tuple[str, dict[str, Any]]:
        """(registered mixer type, constructor options) of a layer name."""
        opts = dict(self.mixers.get(name, {}))
        return opts.pop("type", name), opts

    def _check_dimensions(self) -> None:
        """Build each distinct part on the meta device, so impossible sizes fail now and name the field."""
        import torch

        with torch.device("meta"):
            for name in sorted(set(self.layer_names)):
                type_name, opts = self.mixer_spec(name)
                try:
                    registry.get("mixer", type_name).obj(self.d_model, causal=self.causal, **opts)
                except (ValueError, TypeError) as e:
                    raise ValueError(f"layer {name!r} ({type_name}) with d_model={self.d_model}: {e}") from None
            for f in sorted(set(self.ffn_names) - {"none"}):
                try:
                    registry.get("ffn", f).obj(self.d_model, **self.ffn_options)
                except (ValueError, TypeError) as e:
                    raise ValueError(f"ffn {f!r} with d_model={self.d_model}: {e}") from None

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a model config must be a JSON object; got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"model config has unknown field {unknown[0]!r}; valid fields are: {', '.join(sorted(names))}"
            )
        return cls(**d)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            from effarch.utils import atomic_write_text

            atomic_write_text(path, text + "\n")
        return text

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike) -> ModelConfig:
        """Read a config from a JSON file (or a JSON string)."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            try:
                with open(path_or_text, encoding="utf-8") as f:
                    text = f.read()
            except FileNotFoundError:
                raise ValueError(f"config file {str(path_or_text)!r} does not exist") from None
            except (UnicodeDecodeError, IsADirectoryError):
                raise ValueError(f"config file {str(path_or_text)!r} is not a UTF-8 JSON text file") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"config {str(path_or_text)[:80]!r} is not valid JSON ({e.msg} at line {e.lineno})"
            ) from None
        return cls.from_dict(d)
