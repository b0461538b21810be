"""The paper's baseline, mode ``hf-generate``: Huggingface ``model.generate()`` on static batches.

What is timed, and how (all times are ``time.perf_counter()`` seconds since the run's start,
read after a device synchronisation):

- Requests are taken in arrival order, ``batch_size`` at a time. A batch starts when its last
  member has arrived and the previous batch is done (static batching: nothing joins a batch
  that is running). That start is every member's ``prefill_start_s``.
- Prompts are left-padded (attention mask set), and ``generate()`` runs greedy
  (``do_sample=False``) with ``min_new_tokens = max_new_tokens`` = the batch's longest request,
  so EOS never stops a sequence and every request gets exactly the tokens it asked for.
  A request that asked for fewer tokens keeps the first ones it got.
- A ``transformers`` streamer stamps every token as ``generate()`` produces it: the first
  ``put()`` is the prompt and is skipped, the next is the first token (= end of prefill, the
  request's ``prefill_end_s`` and first token time), then one per decode step. A request's
  token times are its tokens' stamps, as a client reading the stream would see them.
- One ``StepTrace`` per batch per phase: ``prefill`` (batch start -> first token) and
  ``decode`` (first token -> last token).
- A warm-up ``generate()`` of the first batch (2 tokens) runs before the clock starts
  (allocator, kernels, lazy init); ``warmup=False`` skips it.

Greedy outputs equal per-prompt unbatched ``generate()`` exactly in fp32 on the ``tiny`` model.
For real models, left padding changes the shapes of the matmuls, so fp32 results may differ
in the last bits and, rarely, flip a near-tie argmax; tests/test_baseline.py checks both.
"""

from __future__ import annotations

import time

import torch
from transformers.generation.streamers import BaseStreamer

from splitlab.config import RunConfig
from splitlab.measure.metrics import RequestTrace, Run, StepTrace
from splitlab.system.env import synchronize
from splitlab.workload import Workload

MODE = "hf-generate"
WORKER = "generate"


def greedy_config(model, max_new_tokens: int, pad_token_id: int | None = None):
    """A clean greedy ``GenerationConfig``: exactly ``max_new_tokens`` tokens, EOS ignored.

    Built from scratch (not from the model's own generation config) so that no sampling
    default or repetition penalty a checkpoint ships sneaks into the oracle.
    """
    from transformers import GenerationConfig

    cfg = model.config
    eos = getattr(cfg, "eos_token_id", None)
    if pad_token_id is None:
        pad_token_id = _pad_id(model, None)
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=int(max_new_tokens),
        min_new_tokens=int(max_new_tokens),
        pad_token_id=pad_token_id,
        eos_token_id=eos,
        bos_token_id=getattr(cfg, "bos_token_id", None),
        use_cache=True,
    )


def generate_ids(loaded, prompt_ids, max_new_tokens: int) -> list[int]:
    """The oracle: one prompt, unbatched greedy ``generate()``, exactly ``max_new_tokens`` ids."""
    model = loaded.model
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=loaded.device)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids),
            generation_config=greedy_config(model, max_new_tokens, _pad_id(model, loaded.tokenizer)),
        )
    return [int(t) for t in out[0, ids.shape[1]:].tolist()]


class TimingStreamer(BaseStreamer):
    """Stamps each ``put()`` of ``generate()``; the first put is the prompt and is skipped."""

    def __init__(self, t0: float, device: torch.device):
        self.t0 = t0
        self.device = device
        self.seen_prompt = False
        self.times: list[float] = []
        self.tokens: list[list[int]] = []

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        synchronize(self.device)
        self.times.append(time.perf_counter() - self.t0)
        self.tokens.append([int(t) for t in value.reshape(-1).tolist()])

    def end(self) -> None:
        pass


def _pad_id(model, tokenizer) -> int:
    """The pad id generate() uses: the tokenizer's pad, else the model's, else EOS, else 0."""
    for value in (
        getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None,
        getattr(model.config, "pad_token_id", None),
        getattr(model.config, "eos_token_id", None),
    ):
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _batch_tensors(prompts: list[tuple[int, ...]], pad_id: int, device: torch.device):
    """Left-padded ``input_ids`` and the matching ``attention_mask``."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def warm_up_static(model, requests, batch_size: int) -> None:
    """One-time costs off the clock: the first batch's own shapes, padded, 2 tokens."""
    hf = model.model
    pad_id = _pad_id(hf, model.tokenizer)
    ids, mask = _batch_tensors([r.prompt_ids for r in list(requests)[:batch_size]], pad_id, model.device)
    with torch.inference_mode():
        hf.generate(input_ids=ids, attention_mask=mask, generation_config=greedy_config(hf, 2, pad_id))
    synchronize(model.device)


def serve_static_batches(model, requests, batch_size: int, t0: float, worker: str = WORKER,
                         on_batch=None) -> tuple[dict[int, RequestTrace], list[StepTrace]]:
    """Serve ``requests`` (sorted by arrival) in static ``generate()`` batches, in real time
    from ``t0`` (a ``time.perf_counter()`` value; arrivals are relative to it); return the
    traces by request id and the step traces. ``on_batch(batch)`` runs after each batch.

    The loop of ``run_hf_generate``, callable on its own so that each ``replicas`` process
    serves its share of a workload from a t0 shared by all of them.
    """
    hf = model.model
    device = model.device
    pad_id = _pad_id(hf, model.tokenizer)
    requests = sorted(requests, key=lambda r: (r.arrival_s, r.id))
    batches = [requests[i:i + batch_size] for i in range(0, len(requests), batch_size)]
    traces: dict[int, RequestTrace] = {
        r.id: RequestTrace(id=r.id, arrival_s=r.arrival_s, prompt_len=r.prompt_len,
                           max_new_tokens=r.max_new_tokens, worker=worker)
        for r in requests
    }
    steps: list[StepTrace] = []
    for batch in batches:
        ready = max(r.arrival_s for r in batch)
        wait = ready - (time.perf_counter() - t0)
        if wait > 0:
            time.sleep(wait)
        start = time.perf_counter() - t0
        longest = max(r.max_new_tokens for r in batch)
        ids, mask = _batch_tensors([r.prompt_ids for r in batch], pad_id, device)
        streamer = TimingStreamer(t0, device)
        with torch.inference_mode():
            out = hf.generate(
                input_ids=ids, attention_mask=mask, streamer=streamer,
                generation_config=greedy_config(hf, longest, pad_id),
            )
        synchronize(device)
        new = out[:, ids.shape[1]:].tolist()
        times = streamer.times
        if len(times) != longest or any(len(row) != longest for row in new):
            raise RuntimeError(
                f"generate() produced {len(times)} streamed steps / {[len(r) for r in new]} tokens "
                f"for a batch that asked for {longest}; the EOS-ignoring config was not honoured"
            )
        for row, r in enumerate(batch):
            t = traces[r.id]
            t.prefill_start_s = start
            t.prefill_end_s = times[0]
            t.token_times_s = list(times[: r.max_new_tokens])
            t.output_ids = [int(x) for x in new[row][: r.max_new_tokens]]
        ids_in_batch = [r.id for r in batch]
        steps.append(StepTrace(worker, "prefill", start, times[0], ids_in_batch,
                               sum(r.prompt_len for r in batch)))
        if longest > 1:
            steps.append(StepTrace(worker, "decode", times[0], times[-1], ids_in_batch,
                                   len(batch) * (longest - 1)))
        if on_batch is not None:
            on_batch(batch)
    return traces, steps


def _run_hf_generate(workload: Workload, model, batch_size: int = 8, progress: bool = True,
                     warmup: bool = True) -> Run:
    """Run ``workload`` through HF ``generate()`` on static batches; return a ``Run``
    (``splitlab.run(..., mode="hf-generate")``, which checked the input).

    ``model`` is a ``splitlab.models.LoadedModel``. See the module docstring for what is timed.
    """
    from splitlab.modes.common import build_run, peak_bytes, reset_peak

    device = model.device
    requests = list(workload.requests)  # sorted by arrival
    if warmup:
        warm_up_static(model, requests, batch_size)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(requests), desc=f"{MODE} {model.spec}", unit="req", disable=not progress,
               leave=False)
    reset_peak(device)
    synchronize(device)
    t0 = time.perf_counter()
    try:
        traces, steps = serve_static_batches(model, requests, batch_size, t0,
                                             on_batch=lambda batch: bar.update(len(batch)))
    finally:
        bar.close()
    peak = peak_bytes(device)
    config = RunConfig(mode=MODE, batch_size=batch_size,
                       effective={"device": str(device), "dtype": str(model.dtype).replace("torch.", ""),
                                  "warmup": warmup})
    return build_run(config, model, workload, traces.values(), steps, {} if peak is None else {"peak_bytes": peak})
