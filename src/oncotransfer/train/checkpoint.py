"""Resumable training state: model, best epoch and optimizer as safetensors + JSON (no pickle)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError

from oncotransfer.io import atomic_save_tensors, read_tensors, write_json
from oncotransfer.train import distributed as D
from oncotransfer.train.loop import FitState
from oncotransfer.train.schedule import Schedule

log = logging.getLogger("oncotransfer.train")


def flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state -> (tensors, JSON) so resume state needs no pickle either."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{pid}.{name}"] = value
            elif value is not None:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for key, value in info["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def save_fit_state(path: Path, module: torch.nn.Module, opt, st: FitState, sched: Schedule | None = None) -> None:
    tensors = {f"model.{k}": v for k, v in module.state_dict().items()}
    if st.best_state is not None:
        tensors.update({f"best.{k}": v for k, v in st.best_state.items()})
    opt_t, opt_info = flatten_optimizer(opt)
    tensors.update(opt_t)
    info = {"epoch": st.epoch, "history": st.history, "best_epoch": st.best_epoch,
            "best_score": list(st.best_score), "bad_epochs": st.bad_epochs, "optimizer": opt_info,
            **({"schedule": sched.state_dict()} if sched else {})}
    # The JSON rides inside the tensors file too: one file, one atomic rename, so a kill between two writes
    # can never pair epoch k's weights with epoch k-1's counters. The .json beside it is for people.
    atomic_save_tensors(tensors, path.with_suffix(".safetensors"), {_INFO: json.dumps(info, default=str)})
    write_json(path.with_suffix(".json"), info)


_INFO = "fit_state"


def _read_state(path: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(info, tensors) of a saved fit state; a state written before the info rode in the tensors file reads its
    .json; None (start the fold again) when neither is whole."""
    tensors_file = path.with_suffix(".safetensors")
    try:
        tensors, meta = read_tensors(tensors_file)
        info = json.loads(meta[_INFO]) if _INFO in meta else json.loads(path.with_suffix(".json").read_text())
        return info, tensors
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, SafetensorError) as e:  # damaged by hand or by a disk: retrain that fold
        log.warning(f"warning: resume state {tensors_file} is damaged ({str(e).splitlines()[0][:120]}); "
                    "that fold starts again")
        return None


def load_fit_state(path: Path, module: torch.nn.Module, opt, sched: Schedule | None = None) -> FitState:
    """The saved fit state, read by rank 0 and sent to the others (their file system may not hold it)."""
    saved = None
    if D.is_main() and path.with_suffix(".safetensors").is_file():
        saved = _read_state(path)
    saved = D.broadcast(saved)
    if saved is None:
        return FitState()
    info, tensors = saved
    module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    unflatten_optimizer(opt, tensors, info["optimizer"])
    if sched is not None and "schedule" in info:  # state written before schedules existed: constant lr
        sched.load_state_dict(info["schedule"])
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
    return FitState(info["epoch"], info["history"], info["best_epoch"], tuple(info["best_score"]), best,
                    info["bad_epochs"])
