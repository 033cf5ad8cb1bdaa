"""Where the library may call torch.distributed collectives, checked statically and at run time.

NCCL moves only CUDA tensors, gloo only CPU ones, so a collective of a tensor built with
`torch.tensor([...])` passes every gloo test and raises on the first GPU step. The rule: host
values (flags, counts, metrics, error strings) go through `megatron_opdlm.runtime.collectives`,
which puts them on the group's device. Tensor collectives inside the model math run on the
tensors' own device (the model's, CUDA on a GPU) and are allowed in the modules listed below.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
from pathlib import Path

import torch
import torch.distributed as dist

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_opdlm"

COLLECTIVES = frozenset({
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "reduce",
    "reduce_scatter", "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "barrier",
    "monitored_barrier", "gather", "gather_object", "scatter", "scatter_object_list",
    "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv", "batch_isend_irecv",
})  # fmt: skip

# module (relative to megatron_opdlm/) -> why its direct collectives are on the right device
ALLOWED = {
    "distill/vocab_parallel.py": "vocab-parallel softmax/KL/top-K of logits, on the logits' device",
    "models/vocab.py": "TP sum of an embedding row for the mask-token init, on the weight's device",
}


def _is_distributed(node: ast.expr, aliases: set[str]) -> bool:
    """`dist` / `torch.distributed` (or another alias bound to torch.distributed)."""
    if isinstance(node, ast.Name):
        return node.id in aliases
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "distributed"
        and isinstance(node.value, ast.Name)
        and node.value.id == "torch"
    )


def direct_collective_calls(source: str) -> list[tuple[int, str]]:
    """(line, name) of every torch.distributed collective called or imported in `source`."""
    tree = ast.parse(source)
    aliases: set[str] = set()
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom):
            if node.module == "torch" and any(a.name == "distributed" for a in node.names):
                aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
            if node.module == "torch.distributed":
                found += [(node.lineno, a.name) for a in node.names if a.name in COLLECTIVES]
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in COLLECTIVES
            and _is_distributed(node.value, aliases)
        ):
            found.append((node.lineno, node.attr))
    return sorted(found)


def violations(package: Path = PACKAGE) -> dict[str, list[tuple[int, str]]]:
    """Modules outside runtime/ and ALLOWED that call a collective directly."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package).as_posix()
        if relative.startswith("runtime/") or relative in ALLOWED:
            continue
        calls = direct_collective_calls(path.read_text())
        if calls:
            out[relative] = calls
    return out


def _caller_module() -> str | None:
    """The megatron_opdlm module (relative path) that issued the current collective, if any:
    the first frame outside torch. None when that frame is not ours (megatron-core, tests)."""
    for frame in inspect.stack()[2:]:
        filename = Path(frame.filename).resolve()
        if "torch" in filename.parts and "site-packages" in filename.parts:
            continue
        if filename.is_relative_to(PACKAGE):
            return filename.relative_to(PACKAGE).as_posix()
        return None
    return None


@contextlib.contextmanager
def guarded_collectives():
    """Run-time form of the rule: every torch.distributed collective that megatron_opdlm issues
    outside runtime/ and ALLOWED raises; every tensor such a collective of ours gets must sit on
    `runtime.collectives.comm_device(group)` (what NCCL demands of it; our calls pass `group=`
    by keyword). Yields the list of
    (module, collective) calls seen, for the test to check that the path ran."""
    from megatron_opdlm.runtime import collectives

    seen: list[tuple[str | None, str]] = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def wrap(name, original):
        def guarded(*args, **kwargs):
            module = _caller_module()
            seen.append((module, name))
            if module is not None and not module.startswith("runtime/") and module not in ALLOWED:
                raise AssertionError(
                    f"{module} calls torch.distributed.{name} directly: use "
                    "megatron_opdlm.runtime.collectives"
                )
            if module is None:  # megatron-core's own collectives are its business
                return original(*args, **kwargs)
            expected = collectives.comm_device(kwargs.get("group"))
            for value in list(args) + list(kwargs.values()):
                tensors = value if isinstance(value, (list, tuple)) else [value]
                for tensor in tensors:
                    if isinstance(tensor, torch.Tensor) and tensor.device != expected:
                        raise AssertionError(
                            f"torch.distributed.{name} from {module} got a tensor on "
                            f"{tensor.device}; the group's backend needs {expected}"
                        )
            return original(*args, **kwargs)

        return guarded

    for name, original in originals.items():
        setattr(dist, name, wrap(name, original))
    try:
        yield seen
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
