"""Training checkpoints without code execution: one safetensors file.

Tensors: the bank (``bank.<name>``) and AdamW's state (``optim.<param index>.<field>``).
Metadata (JSON strings in the safetensors header): the step, the loss history, the run's
fingerprint, the optimiser's parameter groups and what the report needs. One file, so it is
replaced atomically (temporary name, fsync, rename). No RNG state is needed: every random
draw of training is seeded by the step (examples.py).

Reading validates everything before anything is loaded into the bank or the optimiser; a
file that is not a valid checkpoint of this run raises EDiTError naming it and what to do.
"""
import json
from pathlib import Path
from typing import Dict

import torch
from safetensors import SafetensorError, safe_open

from ..errors import EDiTError
from ..util.safetensors_io import complete, save_safetensors

FORMAT = "comfyui-edit-distill-checkpoint"
FIELDS = ("step", "history", "run", "param_groups", "layer_errors_before", "seconds_train")


def save_checkpoint(path: Path, bank: torch.nn.Module, optimizer: torch.optim.Optimizer, info: Dict):
    opt = optimizer.state_dict()
    tensors = {f"bank.{k}": v for k, v in bank.state_dict().items()}
    for index, state in opt["state"].items():
        for field, value in state.items():
            tensors[f"optim.{index}.{field}"] = value if torch.is_tensor(value) else torch.tensor(value)
    meta = {k: json.dumps(info[k]) for k in FIELDS if k != "param_groups"}
    meta.update(format=FORMAT, param_groups=json.dumps(opt["param_groups"]))
    save_safetensors(tensors, path, meta)


def _invalid(path: Path, why: str) -> EDiTError:
    return EDiTError(f"checkpoint is not valid, delete {path} or pick another work folder ({why})")


def load_checkpoint(path: Path, bank: torch.nn.Module, optimizer: torch.optim.Optimizer, run: str) -> Dict:
    """Load ``path`` into ``bank`` and ``optimizer``; return its info (step, history, ...)."""
    problem = complete(path)
    if problem:
        raise _invalid(path, problem)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise _invalid(path, f"it is not a distillation checkpoint: format {meta.get('format')!r}")
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        if isinstance(e, EDiTError):
            raise
        raise _invalid(path, f"it does not read as safetensors: {e}")
    try:
        info = {k: json.loads(meta[k]) for k in FIELDS}
        groups = json.loads(meta["param_groups"])
    except (KeyError, ValueError) as e:
        raise _invalid(path, f"its metadata is incomplete: {type(e).__name__} {e}")
    if info["run"] != run:
        raise _invalid(path, f"it belongs to run {info['run']!r}, not {run!r}")
    if not isinstance(info["step"], int) or info["step"] < 0 or not isinstance(info["history"], list):
        raise _invalid(path, f"step {info['step']!r} or its history is malformed")

    expected = bank.state_dict()
    found = {k[len("bank."):]: v for k, v in tensors.items() if k.startswith("bank.")}
    wrong = [k for k, v in expected.items() if k not in found or found[k].shape != v.shape]
    if wrong or set(found) - set(expected):
        raise _invalid(path, f"its bank does not match this run's bank (first mismatch: "
                             f"{(wrong or sorted(set(found) - set(expected)))[0]})")
    if not all(torch.isfinite(v).all() for v in found.values()):
        raise _invalid(path, "its bank has non-finite values")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: Dict[int, Dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, field = key.split(".", 2)
            if not index.isdigit() or int(index) >= len(params):
                raise _invalid(path, f"optimiser tensor {key} has no parameter")
            state.setdefault(int(index), {})[field] = value
    for index, fields in state.items():
        for field in ("exp_avg", "exp_avg_sq"):
            if field not in fields or fields[field].shape != params[index].shape:
                raise _invalid(path, f"optimiser state {index}.{field} is missing or has the wrong shape")
    if len(groups) != len(optimizer.param_groups) or any(
            sorted(g.get("params", [])) != list(range(sum(len(h["params"]) for h in optimizer.param_groups[:i]),
                                                      sum(len(h["params"]) for h in optimizer.param_groups[:i + 1])))
            for i, g in enumerate(groups)):
        raise _invalid(path, "its optimiser parameter groups do not match this run")

    bank.load_state_dict(found)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return info
