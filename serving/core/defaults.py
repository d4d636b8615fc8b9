"""Default limits and batching settings, in one place: the core's own defaults and the server's flags.

Constants only (no imports), so the server's config can read them and stay a leaf.
"""

MAX_BATCH_SIZE = 32  # rows per model call
MAX_DELAY_MS = 2.0  # longest a queued row waits for a batch to fill while the model is busy
MAX_QUEUE_ROWS = 2048  # rows queued per model version
INLINE_BELOW_MS = 0.5  # a batch expected to take less runs on the event loop when idle
LOW_PRIORITY_MAX_WAIT_MS = 200.0  # low-priority rows (explanations) go first once they waited this long
TOP_K = 5
MAX_EXPLAIN_COPIES = 4096  # occlusion's masked copies per request, all its images together
MAX_IMAGES = 256  # per request
MAX_PIXELS = 50_000_000  # per image, read from the header before decoding
MAX_REQUEST_PIXELS = 128 * 1024 * 1024  # per request, all images together
INPUT_BUDGET_MB = 256  # decoded and queued input, server-wide
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"  # --device, and a model's config.json "device"
