"""`python -m serving bench`: how much of the model's raw speed survives the trip through the server.

For each model, in one run:
  (a) the limit: ONNX Runtime in this process, the server's session options, at several batch sizes;
  (b) the server (started here, or --server) under load from `serving.tools.loadgen` in a separate process:
      unary single-image requests at concurrency 1, 16 and 64, unary requests of 32 images, and
      ClassifyStream as the scoring job uses it, each with PNG images and with raw tensors;
  (c) a second server with batching off (max_batch_size 1), the baseline batching must beat;
  (d) the transport's ceiling: the Echo RPC on the same server and load generator (the benchmark-only
      `convserve.v1.Bench` service: servers started here get `--bench-service`; a server given with
      --server needs it too for the echo scenarios, and takes the connection flags: TLS, token).
  (e) the same server's HTTP port (--http-server with --server), from the same load generator: the Open
      Inference Protocol's infer with binary tensor data (PNG as BYTES, and tensors) at concurrency 1 and
      64, with JSON tensors, and one PNG per request as curl sends it to :classify, against their gRPC
      counterparts (`kserve …`, `unary c64 png`).
With `--metrics on,off` every scenario runs against a server with its metrics endpoint on and one with
it off, in the same rounds (names ending "(metrics off)"), to measure what the metrics cost.
The limit and the scenarios alternate in short rounds, every model in every round, so drift in the
machine's speed hits them all alike; figures are medians over the rounds with their range. Writes a
Markdown table and JSON.

One job per module: `arguments` (the flags), `scenarios` (what runs, and the load generator's command),
`processes` (servers and the load generator), `in_process` (the limit), `measure` (a model's rounds),
`summary` (medians and ratios), `targets` (the goals), `markdown` (the report), `run` (the command).
"""

from serving.tools.bench.arguments import add_bench_arguments
from serving.tools.bench.run import run_bench
from serving.tools.bench.targets import resize_targets

__all__ = ["add_bench_arguments", "resize_targets", "run_bench"]
