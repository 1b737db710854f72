"""CPU inference speed: PyTorch eager vs ONNX Runtime, and the HTTP service under 4 concurrent clients.

    HF_HUB_OFFLINE=1 python benchmarks/inference.py [--run RUN_DIR] [--requests 200] [--repeats 30]

Models: EfficientNet-Lite0 and MobileNetV2 at 224 px with random weights (speed does not depend on them) and
the paper's Dense(100) head, probabilities out. Single image: median latency over ``--repeats`` calls.
Batch 32: images/s over a few batches. Service: a run (the newest under runs/ unless given; exported to
ONNX first if it has no export) served by uvicorn on 127.0.0.1, 4 client threads posting a real demo tile
for ``--requests`` requests in all. Targets: ORT <= 10 ms/image and >= 150 img/s at batch 32; service
>= 40 req/s with zero errors.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _time(fn, repeats: int) -> float:
    fn()  # warm-up: first calls allocate and pick kernels
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_model(name: str, repeats: int, tmp: Path) -> list[tuple]:
    from oncotransfer.config import HeadConfig
    from oncotransfer.infer.export import ProbabilityModel
    from oncotransfer.runtime import export_onnx, ort_session
    from oncotransfer.models.factory import create_classifier
    model = ProbabilityModel(create_classifier(name, "none", HeadConfig(), 3, image_size=224)).eval()
    x1, x32 = torch.randn(1, 3, 224, 224), torch.randn(32, 3, 224, 224)
    rows = []
    cl = model.to(memory_format=torch.channels_last)  # the project's CPU default for MobileNet-class nets

    def eager(x):
        with torch.inference_mode():
            return cl(x.contiguous(memory_format=torch.channels_last))
    single = _time(lambda: eager(x1), repeats)
    batch = _time(lambda: eager(x32), max(3, repeats // 10))
    rows.append((name, "PyTorch eager (fp32, channels_last)", single * 1e3, 32 / batch))
    sess = ort_session(export_onnx(model.to(memory_format=torch.contiguous_format), tmp / f"{name}.onnx", 224))
    inp = sess.get_inputs()[0].name
    a1, a32 = x1.numpy(), x32.numpy()
    single = _time(lambda: sess.run(None, {inp: a1}), repeats)
    batch = _time(lambda: sess.run(None, {inp: a32}), max(3, repeats // 10))
    rows.append((name, "ONNX Runtime", single * 1e3, 32 / batch))
    return rows


def _newest_run() -> Path:
    runs = sorted((p for p in (ROOT / "runs").glob("*/") if (p / "checkpoint" / "meta.json").is_file()),
                  key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit("no run under runs/; train one first: oncotransfer train configs/demo.yaml")
    return runs[-1]


def bench_service(run_dir: Path, n_requests: int, clients: int = 4) -> tuple[str, float, int, float]:
    import httpx
    import uvicorn
    from oncotransfer.data.demo import demo_path
    from oncotransfer.infer.export import export_run
    from oncotransfer.serve.app import create_app
    if not (run_dir / "export" / "model.onnx").is_file():
        export_run(run_dir, "onnx")
    app = create_app(run_dir, engine="auto")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    image = sorted(demo_path("osteosarcoma").rglob("*.jpg"))[0]
    payload = image.read_bytes()
    counter = iter(range(n_requests))
    lock = threading.Lock()
    errors = [0]

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                r = c.post("/predict", files={"file": (image.name, payload, "image/jpeg")})
                if r.status_code != 200:
                    with lock:
                        errors[0] += 1
    c0 = httpx.post(url + "/predict", files={"file": (image.name, payload, "image/jpeg")})  # warm-up
    assert c0.status_code == 200, c0.text
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    seconds = time.perf_counter() - t0
    server.should_exit = True
    thread.join(timeout=10)
    return app.state.predictor.engine, n_requests / seconds, errors[0], seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=None)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    import tempfile
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("efficientnet_lite0", "mobilenet_v2"):
            rows += bench_model(name, args.repeats, Path(tmp))
    print("\n| model | engine | 1 image (ms, median) | batch 32 (img/s) | target (ORT <= 10 ms, >= 150 img/s) |")
    print("|---|---|---:|---:|---|")
    for name, engine, ms, ips in rows:
        ok = "" if engine != "ONNX Runtime" else ("met" if ms <= 10 and ips >= 150 else "MISSED")
        print(f"| {name} | {engine} | {ms:.1f} | {ips:.0f} | {ok} |")
    from roofline import print_feasibility
    measured = {}
    for name, engine, ms, ips in rows:
        if engine == "ONNX Runtime":
            measured[(name, "ORT inference, batch 32 (issue 5)")] = ips
            measured[(name, "ORT inference, one image (issue 5)")] = ms
    print_feasibility(measured, only="issue 5")
    run = args.run or _newest_run()
    engine, rps, errs, secs = bench_service(run, args.requests)
    print(f"\n| service ({run.name}, engine {engine}) | requests | clients | seconds | req/s | errors | target |")
    print("|---|---:|---:|---:|---:|---:|---|")
    verdict = "met" if rps >= 40 and errs == 0 else "MISSED"
    print(f"| POST /predict, loopback | {args.requests} | 4 | {secs:.1f} | {rps:.1f} | {errs} | >= 40 req/s, 0 errors: {verdict} |")


if __name__ == "__main__":
    main()
