"""Config edge cases (issue 22): recursive YAML aliases, files that are not UTF-8 or not text, YAML tags for
binary data and Python objects, infinite, NaN and huge numbers, a hidden layer of 10^8 units, names of 300
characters, output folders that cannot exist, a device this machine lacks, two stages with one name; through
``train`` (file and ``--set``), ``grid`` and ``data inspect``. Each must fail in one line naming the key or file,
and leave no run folder behind."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from core import ROOT, Case

sys.path.insert(0, str(ROOT / "benchmarks"))
from faults_ingest import config, images  # noqa: E402

F = "config_edges"


def build(t: Path) -> list[Case]:
    cases: list[Case] = []
    good = images(t / "good")
    base = Path(config(t, good))

    def add(name, args, needles, want_error=True, timeout=60, **kw):
        kw.setdefault("no_run_folder", want_error)
        cases.append(Case(F, name, args, want_error, tuple(needles), timeout=timeout, **kw))

    def cfg_file(name: str, text: str | bytes) -> str:
        p = t / f"{name}.yaml"
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return str(p)

    body = base.read_text()

    # --- the file itself
    for name, text, needle in (
            ("recursive_alias", "a: &a [*a]\n" + body, "recursive"),
            ("recursive_map", "name: &n {x: *n}\n" + body.replace("name: f\n", ""), "recursive"),
            ("recursive_in_train", body.replace("train: {", "train: &tr {extra: *tr, "), "recursive"),
            ("latin1", body.replace("name: f", "name: caf\xe9").encode("latin-1"), "UTF-8"),
            ("utf16", body.encode("utf-16"), "UTF-8"),
            ("binary_noise", os.urandom(300), "UTF-8"),
            ("nul_bytes", body.encode() + b"\0\0\0", "line"),
            ("binary_tag_name", body.replace("name: f", "name: !!binary aGVsbG8="), "!!binary"),
            ("binary_tag_path", body.replace("data: {path: ", "data: {path: !!binary aGVsbG8=, x: "), "!!binary"),
            ("python_tag", "!!python/object/apply:os.system ['echo pwned']\n", "python/object"),
            ("set_tag", body.replace("name: f", "name: !!set {a, b}"), "'name'"),
            ("timestamp_name", body.replace("name: f", "name: 2001-12-14"), "'name'"),
            ("merge_key", "x: &x {epochs: 1}\n" + body.replace("train: {", "train: {<<: *x, "), "x"),
            ("empty_file", "", "data.path is not set"),
            ("only_comment", "# nothing\n", "data.path is not set"),
            ("top_list", "- a\n- b\n", "mapping"),
            ("top_string", "hello\n", "mapping"),
            ("duplicate_keys", body + "name: other\n", "name"),
            ("tab_indent", "data:\n\tpath: x\n", "line"),
            ("bom", "\ufeff" + body, None),
    ):
        path = cfg_file(name, text)
        needles = (() if name in ("empty_file", "only_comment") else (Path(path).name,)) + ((needle,) if needle else ())
        want = needle is not None
        add(f"train file {name}", ["train", path], needles if want else ("fold",), want_error=want,
            timeout=60 if want else 300)
    add("train config is a folder", ["train", str(t)], ("config",))
    add("train config /dev/zero", ["train", "/dev/zero"], ("/dev/zero",))
    big = t / "huge.yaml"
    with open(big, "wb") as f:
        f.write(b"name: x\n")
        f.truncate(2**40)
    add("train sparse 1 TiB config", ["train", str(big)], ("huge.yaml", "too large"))
    fifo = t / "fifo.yaml"
    os.mkfifo(fifo)
    add("train FIFO config", ["train", str(fifo)], ("fifo.yaml",))

    # --- numbers: infinite, NaN, huge
    for key, value, needle in (
            ("train.weight_decay", ".inf", "train.weight_decay"), ("train.weight_decay", "1e308", "train.weight_decay"),
            ("train.weight_decay", ".nan", "train.weight_decay"), ("train.lr", ".inf", "train.lr"),
            ("train.lr", ".nan", "train.lr"), ("train.lr", "-.inf", "train.lr"),
            ("train.warmup_epochs", ".nan", "train.warmup_epochs"),
            ("train.warmup_epochs", ".inf", "train.warmup_epochs"),
            ("train.min_lr_ratio", ".nan", "train.min_lr_ratio"),
            ("train.label_smoothing", ".nan", "train.label_smoothing"),
            ("train.plateau_factor", ".nan", "train.plateau_factor"),
            ("train.backbone_lr_mult", ".nan", "train.backbone_lr_mult"),
            # a huge patience or memory cap only means "never" / "no cap": accepted, and the run must finish
            ("train.cache_memory_mb", str(10**30), None), ("train.early_stop_patience", str(10**30), None),
            ("train.plateau_patience", str(10**30), None),
            ("model.head.dropout", ".nan", "model.head.dropout"),
            ("model.head.hidden", "[100000000]", "model.head.hidden"),
            ("model.head.hidden", "[65536, 65536]", "model.head.hidden"),
            ("model.head.hidden", "[" + ", ".join(["64"] * 10000) + "]", "model.head.hidden"),
            ("augment.rotation", ".nan", "augment.rotation"), ("augment.zoom", ".inf", "augment.zoom"),
            ("augment.shift", ".nan", "augment.shift"), ("augment.brightness", ".nan", "augment.brightness"),
            ("split.test_size", ".nan", "split.test_size"), ("split.val_size", ".nan", "split.val_size"),
            ("evaluate.ood_pass_rate", ".nan", "evaluate.ood_pass_rate"),
            ("data.image_size", str(10**9), "data.image_size"), ("train.epochs", "1e9", "train.epochs"),
            ("train.batch_size", str(2**64), "train.batch_size"), ("split.folds", str(10**20), "split.folds"),
    ):
        if needle is None:
            add(f"train --set {key}={value[:20]} (accepted)", ["train", str(base), "--set", f"{key}={value}"],
                ("fold",), want_error=False, timeout=300)
        else:
            add(f"train --set {key}={value[:20]}", ["train", str(base), "--set", f"{key}={value}"], (needle,))
    # the same in the file rather than --set
    add("train file weight_decay .inf", ["train", cfg_file("wd_inf", body.replace("train: {", "train: {weight_decay: "
                                                                                   ".inf, "))],
        ("train.weight_decay",))
    add("train file hidden 10^8", ["train", cfg_file("hidden", body.replace("freeze: frozen}", "freeze: frozen, "
                                                                            "head: {hidden: [100000000]}}"))],
        ("model.head.hidden",))

    # --- names and folders
    for name, value, needle in (("300 chars", "n" * 300, "'name'"), ("256 chars", "n" * 256, "'name'"),
                                ("NUL", '"a\\0b"', "'name'"), ("newline", '"a\\nb"', "'name'"),
                                ("escape", "a\x1b[2Jb", "'name'"), ("tab", "a\tb", "'name'"),
                                ("spaces", "   ", "'name'")):
        add(f"train name {name}", ["train", str(base), "--set", f"name={value}"], (needle,))
    loop = t / "loop"
    os.symlink(loop, loop)
    (t / "afile").write_text("x")
    for what, value in (("under /proc", "/proc/oncotransfer_runs"), ("symlink loop", str(loop / "runs")),
                        ("a file", str(t / "afile")), ("under a file", str(t / "afile" / "runs")),
                        ("/dev/null", "/dev/null"),
                        ("under /sys", "/sys/kernel/oncotransfer"), ("name too long", str(t / ("x" * 300))),
                        ("empty", "''")):
        add(f"train output_dir {what}", ["train", str(base), "--set", f"output_dir={value}"], ("output_dir",))
    for what, value in (("under /proc", "/proc/oncotransfer_cache"), ("symlink loop", str(loop / "c")),
                        ("a file", str(t / "afile"))):
        add(f"train cache_dir {what}", ["train", str(base), "--set", f"train.cache_dir={value}"],
            ("train.cache_dir",))

    # --- devices and stages
    add("train device mps on Linux", ["train", str(base), "--set", "train.device=mps"], ("train.device", "mps"))
    add("train device cuda without GPU", ["train", str(base), "--set", "train.device=cuda"], ("train.device", "cuda"),
        env={"CUDA_VISIBLE_DEVICES": ""})
    add("train device tpu", ["train", str(base), "--set", "train.device=tpu"], ("train.device",))
    stages2 = body + "stages:\n  - {name: s1}\n  - {name: s1}\n"
    add("train two stages one name", ["train", cfg_file("stages_dup", stages2)], ("stages", "s1"))
    add("train stage name 300 chars", ["train", cfg_file("stage_long", body + f"stages:\n  - {{name: {'s' * 300}}}\n")],
        ("stages",))
    add("train stage name NUL", ["train", cfg_file("stage_nul", body + "stages:\n  - {name: \"a\\0b\"}\n")],
        ("stages",))
    add("train stages not a list", ["train", cfg_file("stage_map", body + "stages: {name: s}\n")], ("stages",))
    add("train stage init_from missing", ["train", cfg_file("stage_init", body + "stages:\n  - {name: s1, "
                                                            f"init_from: {t / 'nowhere'}}}\n")],
        ("nowhere", "checkpoint"))

    # --- --set forms
    for item, needle in (("train.lr", "key=value"), ("=1", "key"), ("train..lr=1", "train"),
                         ("train.lr.x=1", "train.lr"), ("stages.99.name=x", "stages"),
                         ("data.path=" + "x" * 5000, "longer than the file system allows"), ("train.lr=!!binary aGVsbG8=", "train.lr"),
                         ("train.lr=&a [*a]", "train.lr"), ("train.lr=!!python/name:os.system", "train.lr")):
        add(f"train --set {item[:30]}", ["train", str(base), "--set", item], (needle,))

    # --- grid files
    for name, text, needle in (("recursive", "a: &a [*a]\nbase: {}\n", "recursive"),
                               ("latin1", "name: caf\xe9\nbase: {}\n".encode("latin-1"), "UTF-8"),
                               ("binary_tag", f"base_config: {base}\ngrid:\n  name: [!!binary aGVsbG8=]\n",
                                "!!binary"),
                               ("inf_value", f"base_config: {base}\ngrid:\n  train.weight_decay: [.inf]\n",
                                "train.weight_decay"),
                               ("hidden_1e8", f"base_config: {base}\ngrid:\n  model.head.hidden: [[100000000]]\n",
                                "model.head.hidden"),
                               ("name_300", f"base_config: {base}\nname: {'g' * 300}\n", "name"),
                               ("output_proc", f"base_config: {base}\noutput_dir: /proc/grids\n", "output_dir"),
                               ("device_mps", f"base_config: {base}\ngrid:\n  train.device: [mps]\n", "train.device"),
                               ("base_config_self", "base_config: SELF\n", "base_config"),
                               ("base_config_dev_zero", "base_config: /dev/zero\n", "/dev/zero")):
        p = t / f"grid_{name}.yaml"
        data = text if isinstance(text, bytes) else text.replace("SELF", p.name).encode()
        p.write_bytes(data)
        # a run's own error (device) and an output folder's name the key and path, not the grid file
        named = () if name in ("device_mps", "output_proc") else (p.name if needle != "/dev/zero" else "/dev/zero",)
        # the device is checked where each run starts (a Ray worker may have the GPU the head lacks): the grid's
        # folder then records the failed runs
        add(f"grid {name}", ["grid", str(p)], named + (needle,), **({"no_run_folder": False}
                                                                  if name == "device_mps" else {}))
    return cases
