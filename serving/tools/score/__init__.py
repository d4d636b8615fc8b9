"""`python -m serving score INPUT --out results.jsonl`: a batch scoring job.

Images are read and sent while earlier answers come back: each server gets `--streams` long-lived
ClassifyStream calls, all fed from one queue of chunks (`--batch` images per message) with at most
`--inflight` images unanswered. Chunks are packed by bytes as well, under the server's message limit
(`--max-message-mb`, lowered to what the server says when it refuses a message as too large), and a
file larger than that limit gets its own error line instead of sinking its chunk. A stream that
breaks puts its unanswered chunks back on the queue, so the other servers (or the same one, once it
is back) score them. One output line per image, in the order answers arrive; rerunning with the same
`--out` skips what is already there. Only regular files are read: a FIFO, a device, a dangling
symbolic link or a loop of links gets a line saying it was skipped (reading a FIFO would block the
job for ever).

`--local MODEL_DIR` runs the very same data plane in process (decode pool, dynamic batcher, ONNX
Runtime, top-k), with no server: for a laptop, and as the reference.

File names need not be valid UTF-8: undecodable bytes are kept as they are (Python's
surrogateescape), so the CSV's path column holds the file's real name byte for byte, JSONL escapes
them (as \\udcXX), and a rerun matches both.

One job per module: `arguments` (the flags), `inputs` (which files), `results_file` (the lines written,
and resume), `chunks` (files packed into messages), `job` (the state the workers share), `remote`
(streams to servers, with failover), `local` (the data plane in process), `run` (the job itself).
"""

from serving.tools.score.arguments import add_score_arguments
from serving.tools.score.errors import ScoreError
from serving.tools.score.run import Summary, run_score, score

__all__ = ["ScoreError", "Summary", "add_score_arguments", "run_score", "score"]
