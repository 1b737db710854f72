"""CPU inference speed: PyTorch eager vs ONNX Runtime, and the HTTP service under 4 concurrent clients.

    HF_HUB_OFFLINE=1 python benchmarks/inference.py [--run RUN_DIR] [--requests 200] [--repeats 30]
        [--overload-seconds 20] [--service-only]

Models: EfficientNet-Lite0 and MobileNetV2 at 224 px with random weights (speed does not depend on them) and
the paper's Dense(100) head, probabilities out. Single image: median latency over ``--repeats`` calls.
Batch 32: images/s over a few batches. Service: a run (the newest under runs/ unless given; exported to
ONNX first if it has no export) served by ``oncotransfer serve`` (its own process) on 127.0.0.1, 4 client
threads posting a real demo tile for ``--requests`` requests in all. Overload: requests started at 4x that
sustainable rate for ``--overload-seconds``, each on a new connection, whatever the answers; then 12
concurrent 79 KB PNGs declaring 9000 x 9000 px, with the default pixel limit and with the decoded-bytes budget
alone. Targets: ORT <= 10 ms/image and >= 150 img/s at batch 32; service >= 40 req/s with zero errors; under
overload every request answered 200 or 503 (no timeout, no error) with the server's RSS flat; the bombs
refused without memory growth.
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


class ServerProcess:
    """``oncotransfer serve`` in its own process on 127.0.0.1, so its memory (VmRSS, sampled every 20 ms while
    ``watch`` runs) is the server's alone."""

    def __init__(self, run_dir: Path, *args: str):
        import subprocess
        import sys
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"oncotransfer-bench-{self.port}.jsonl"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "oncotransfer.cli", "serve", str(run_dir), "--port",
                                      str(self.port), "--log-file", str(self.log), *args], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        import httpx
        for _ in range(600):
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
            if self.proc.poll() is not None:
                raise SystemExit(f"serve exited: {self.proc.stderr.read().decode()[-500:]}")
        raise SystemExit("serve did not become healthy in 60 s")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def watch(self):
        """Context manager: yields a dict that holds ``before``, and on exit ``after`` and ``peak`` (MB)."""
        import contextlib

        @contextlib.contextmanager
        def cm():
            out = {"before": self.rss_mb(), "peak": 0.0}
            stop = threading.Event()

            def sample():
                while not stop.is_set():
                    out["peak"] = max(out["peak"], self.rss_mb())
                    stop.wait(0.02)
            t = threading.Thread(target=sample, daemon=True)
            t.start()
            try:
                yield out
            finally:
                time.sleep(1.0)  # let the last answers' buffers go before "after"
                stop.set()
                t.join()
                out["after"] = self.rss_mb()
                out["peak"] = max(out["peak"], out["after"])
        return cm()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)
        self.log.unlink(missing_ok=True)


def _payload() -> tuple[str, bytes]:
    from oncotransfer.data.demo import demo_path
    image = sorted(demo_path("osteosarcoma").rglob("*.jpg"))[0]
    return image.name, image.read_bytes()


def closed_loop(url: str, n_requests: int, clients: int = 4) -> tuple[float, int, float]:
    """``clients`` threads posting back to back: (req/s, non-200 answers, seconds)."""
    import httpx
    name, payload = _payload()
    counter = iter(range(n_requests))
    lock = threading.Lock()
    errors = [0]

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                r = c.post("/predict", files={"file": (name, payload, "image/jpeg")})
                if r.status_code != 200:
                    with lock:
                        errors[0] += 1
    c0 = httpx.post(url + "/predict", files={"file": (name, payload, "image/jpeg")}, timeout=120)  # warm-up
    assert c0.status_code == 200, c0.text
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    seconds = time.perf_counter() - t0
    return n_requests / seconds, errors[0], seconds


def open_loop(url: str, rate: float, seconds: float, client_timeout: float) -> dict:
    """Requests started at ``rate`` per second for ``seconds`` whatever the answers (open loop: the load a
    crowd of users makes), each on its own connection; status counts and latencies."""
    import asyncio

    import httpx
    name, payload = _payload()
    results: list[tuple[str, float]] = []

    async def one(c: httpx.AsyncClient) -> None:
        t0 = time.perf_counter()
        try:
            r = await c.post("/predict", files={"file": (name, payload, "image/jpeg")})
            results.append((str(r.status_code), time.perf_counter() - t0))
        except httpx.TimeoutException:
            results.append(("client timeout", time.perf_counter() - t0))
        except httpx.HTTPError as e:
            results.append((f"error {type(e).__name__}", time.perf_counter() - t0))

    async def drive() -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, timeout=client_timeout, limits=limits) as c:
            tasks, t0, k = [], time.perf_counter(), 0
            while (due := t0 + k / rate) < t0 + seconds:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                tasks.append(asyncio.create_task(one(c)))
                k += 1
            await asyncio.gather(*tasks)
    asyncio.run(drive())
    counts: dict[str, int] = {}
    for status, _ in results:
        counts[status] = counts.get(status, 0) + 1
    ok = sorted(t for s, t in results if s == "200")
    q = (lambda f: ok[min(len(ok) - 1, int(f * len(ok)))] * 1e3) if ok else (lambda f: float("nan"))
    return {"requests": len(results), "counts": counts, "p50": q(0.5), "p99": q(0.99)}


def bomb_burst(url: str, n: int = 12) -> dict:
    """``n`` concurrent uploads of a 79 KB PNG declaring 9000 x 9000 px: their status counts."""
    import struct
    import zlib

    import httpx

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(b"\0" * 9001 * 125) for _ in range(72)) + z.flush()
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 9000, 9000, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", idat) + chunk(b"IEND", b""))

    def post(_):
        try:
            return str(httpx.post(url + "/predict", files={"file": ("bomb.png", png, "image/png")},
                                  timeout=120).status_code)
        except httpx.HTTPError as e:
            return type(e).__name__
    with ThreadPoolExecutor(n) as pool:
        got = list(pool.map(post, range(n)))
    return {"png_kb": len(png) / 1024, "counts": {s: got.count(s) for s in sorted(set(got))}}


def bench_service(run_dir: Path, n_requests: int, overload_s: float) -> None:
    from oncotransfer.infer.export import export_run
    if not (run_dir / "export" / "model.onnx").is_file():
        export_run(run_dir, "onnx")
    server = ServerProcess(run_dir)
    try:
        import httpx
        engine = httpx.get(server.url + "/health").json()["engine"]
        rps, errs, secs = closed_loop(server.url, n_requests)
        print(f"\n| service ({run_dir.name}, engine {engine}) | requests | clients | seconds | req/s | errors | target |")
        print("|---|---:|---:|---:|---:|---:|---|")
        verdict = "met" if rps >= 40 and errs == 0 else "MISSED"
        print(f"| POST /predict, loopback | {n_requests} | 4 | {secs:.1f} | {rps:.1f} | {errs} | "
              f">= 40 req/s, 0 errors: {verdict} |")
        rate = 4 * rps
        with server.watch() as mem:
            o = open_loop(server.url, rate, overload_s, client_timeout=60)  # serve's --timeout is 30 s
        c = o["counts"]
        silent = sum(v for k, v in c.items() if k not in ("200", "503"))
        print(f"\n| overload: {rate:.0f} req/s (4x sustainable) for {overload_s:g} s | requests | 200 | 503 | other "
              "| p50 / p99 of 200s (ms) | server RSS before / after / peak (MB) | target |")
        print("|---|---:|---:|---:|---:|---|---|---|")
        flat = mem["after"] - mem["before"] < 100
        verdict = "met" if silent == 0 and flat else "MISSED"
        other = ", ".join(f"{k}: {v}" for k, v in c.items() if k not in ("200", "503")) or "0"
        print(f"| open loop, new connection each | {o['requests']} | {c.get('200', 0)} | {c.get('503', 0)} | "
              f"{other} | {o['p50']:.0f} / {o['p99']:.0f} | {mem['before']:.0f} / {mem['after']:.0f} / "
              f"{mem['peak']:.0f} | every answer 200 or 503, RSS flat (< 100 MB growth): {verdict} |")
        with server.watch() as mem:
            b = bomb_burst(server.url)
        print(f"\n| 12 concurrent 9000 x 9000 PNG uploads ({b['png_kb']:.0f} KB each) | answers | server RSS "
              "before / after / peak (MB) | target |")
        print("|---|---|---|---|")
        grew = mem["peak"] - mem["before"]
        verdict = "met" if set(b["counts"]) == {"413"} and grew < 100 else "MISSED"
        print(f"| default --max-pixels 64 MP | {b['counts']} | {mem['before']:.0f} / {mem['after']:.0f} / "
              f"{mem['peak']:.0f} | all 413, peak < 100 MB over before: {verdict} |")
        lines = sum(1 for _ in server.log.open())
    finally:
        server.close()
    # The budget alone: the same burst with the pixel limit lifted, so only --max-decode-mb stands in the way.
    server = ServerProcess(run_dir, "--max-pixels", "100000000", "--max-decode-mb", "512")
    try:
        with server.watch() as mem:
            b = bomb_burst(server.url)
        print(f"| --max-pixels 100 MP --max-decode-mb 512 (budget only) | {b['counts']} | {mem['before']:.0f} / "
              f"{mem['after']:.0f} / {mem['peak']:.0f} | peak bounded by the budget |")
    finally:
        server.close()
    print(f"\naccess log of the first server: {lines} JSON lines, one a request")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=None)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--overload-seconds", type=float, default=20.0)
    ap.add_argument("--service-only", action="store_true", help="skip the model speed rows")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    if not args.service_only:
        bench_models(args.repeats)
    bench_service(args.run or _newest_run(), args.requests, args.overload_seconds)


def bench_models(repeats: int) -> None:
    import tempfile
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("efficientnet_lite0", "mobilenet_v2"):
            rows += bench_model(name, repeats, Path(tmp))
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


if __name__ == "__main__":
    main()
