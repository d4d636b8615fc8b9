"""The end-to-end demo behind `make demo`: serve the exported model, classify and score real PNGs.

Writes the run's held-out test digits as PNG files, starts `python -m serving serve` on a free
loopback port, prints a top-k table and the accuracy through the server, scores the folder with the
batch scoring job, shows the batch sizes the server formed, prints the web page's address, and stops the
server with SIGTERM — or, with --keep-serving (`make demo-web`), keeps serving until Ctrl-C.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serving.client import ClassifierClient  # noqa: E402
from serving.tools.classify import format_table  # noqa: E402
from serving.tools.launch import launch_server  # noqa: E402


def write_pngs(run_dir: Path, out: Path) -> list[tuple[Path, int]]:
    data = np.load(run_dir / "test_split.npz")
    shutil.rmtree(out, ignore_errors=True)
    files = []
    for i, (pixels, label) in enumerate(zip(data["images"], data["labels"], strict=True)):
        folder = out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:04d}.png"
        Image.fromarray(pixels[0]).save(path)
        files.append((path, int(label)))
    return files


def score(images: Path, out: Path, *where: str) -> None:
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "serving", "score", str(images), "--out", str(out), *where]
    subprocess.run(command, cwd=ROOT, check=True)


def wait_for_interrupt() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--run", type=Path, default=Path("runs/digits"))
    parser.add_argument("--images", type=Path, default=Path("demo-out/digits"))
    parser.add_argument("--keep-serving", action="store_true", help="serve the web page until Ctrl-C")
    args = parser.parse_args()

    files = write_pngs(args.run, args.images)
    print(f"wrote {len(files)} held-out test digits as PNG files under {args.images}/<label>/")
    with tempfile.TemporaryDirectory() as tmp:
        server = launch_server(args.models, Path(tmp), "--log-level", "WARNING", http=True)
        address = server.address
        try:
            with ClassifierClient(address) as client:
                sample = [str(p) for p, _ in files[:3]]
                print(f"\nserver on {address}; top-3 of three images:\n")
                print(format_table(sample, client.classify(sample, top_k=3)))
                paths = [p for p, _ in files]
                results = [
                    r for i in range(0, len(paths), 128) for r in client.classify(paths[i : i + 128], top_k=1)
                ]
                accuracy = np.mean(
                    [r.top.index == label for r, (_, label) in zip(results, files, strict=True)]
                )
                print(f"\naccuracy through the server on {len(files)} test images: {accuracy:.4f}")

            print("\nscoring the folder through the server (python -m serving score):")
            score(args.images, args.images.parent / "scores.jsonl", "--server", address)
            print("the same job in process (--local), the reference:")
            score(args.images, args.images.parent / "scores-local.jsonl", "--local", str(args.models))
            with ClassifierClient(address) as client:
                stats = client.get_model().stats
            sizes = ", ".join(f"{size}: {count}" for size, count in sorted(stats.batch_sizes.items()))
            print(f"\nbatches the server formed (size: count): {sizes}")
            print(f"{stats.requests} requests, {stats.items} images, {stats.batches} model calls")
            page = f"{server.http_url}/"
            if args.keep_serving:
                print(f"\nthe web page: {page} (drop one of {args.images}/*/*.png on it); Ctrl-C stops")
                wait_for_interrupt()
            else:
                print(f"\nthe web page was at {page} while the demo ran; `make demo-web` keeps it up")
        finally:
            code = server.stop()
    print(f"server stopped with exit code {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
