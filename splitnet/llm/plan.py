"""Generation planning: choose the cut and codec for a prompt and a number of new tokens.

For a decoder-only model of n blocks, each layout is priced with the latency model of
``splitnet.planning`` applied per phase (prefill, then one step per token)::

    block.K          edge: embeddings + blocks [0, K); cloud: blocks [K, n) + LM head
      TTFT = edge_prefill(K) * P + P * bytes(codec) / B_up + RTT + queue
             + cloud_prefill(K..n) * P + lm_head_cloud + token / B_down
      step = edge_decode(K) + bytes(codec) / B_up + RTT + queue + cloud_decode(K..n)
             + lm_head_cloud + token / B_down
    block.K:block.M  U-shaped: the cloud runs only [K, M); the edge keeps the LM head and
                     blocks [M, n), so every prompt row comes back down (the edge's tail
                     blocks need their KV cache) and each step sends a vector both ways
    output           everything on the device: no network
    input            everything in the cloud, token ids sent up and down

``P`` is the prompt's length; the whole generation takes ``TTFT + (G - 1) * step`` for
``G`` new tokens, which is what the planner minimizes. Prefill phases are summed, not
overlapped (an upper bound where a session pipelines chunks).

Constraints the user states, each with the reason a layout was rejected:

* ``edge_memory_mb``: the edge's weights plus its KV cache for ``P + G`` tokens fit;
* ``min_edge_blocks``: at least that many blocks run on the device before any hidden
  state leaves it (``input`` has 0: token ids leave);
* ``u_shaped``: only layouts where token ids never leave the device (U-shaped, or all
  on the device);
* codecs: lossless ones always; lossy ones only if the registry marks them safe for
  language-model hidden states (never plain ``int8``/``int8c``) and, where their
  teacher-forced top-1 agreement was measured, it is at least ``min_agreement``.

Costs are inputs (``ModelCosts``): measured on each side, or given. ``model_sizes``
derives the memory side (parameter bytes per block, KV bytes per token per block) from a
transformers config. Planning reads no clock; ``measure_side_cost`` is the one function
that measures (a model's decode step and prefill, here, spread evenly over its blocks).
The server runs it at start-up and publishes the result (``GenerationProfile``);
``profile_to_pb`` and ``profile_from_pb`` carry a ``SideCost`` over the wire, the second
validating what it reads.
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from splitnet.codecs import parse_codec
from splitnet.errors import ConfigError, ProtocolError
from splitnet.llm.cuts import ALL_CLOUD_CUT
from splitnet.planning import LinkEstimate
from splitnet.v1 import generation_pb2 as gpb

__all__ = [
    "ALL_CLOUD",
    "AUTO_CODECS",
    "ALL_EDGE",
    "Constraints",
    "GenerationJob",
    "GenerationPlan",
    "ModelCosts",
    "ModelSizes",
    "PlanResult",
    "SideCost",
    "auto_costs",
    "measure_side_cost",
    "model_sizes",
    "plan_generation",
    "profile_from_pb",
    "profile_to_pb",
]

ALL_EDGE = "output"  # every block and the LM head on the device
ALL_CLOUD = ALL_CLOUD_CUT  # "input": token ids up, token ids down
MB = 1_000_000  # edge_memory_mb counts 10^6 bytes


@dataclass(frozen=True, kw_only=True)
class SideCost:
    """Compute on one side (the edge or the cloud), milliseconds."""

    decode_ms: tuple[float, ...]  # per block: one token's step
    prefill_ms: tuple[float, ...]  # per block: per prompt token in a prefill
    lm_head_ms: float = 0.0  # final norm + LM head for one token (a prefill needs one)
    embed_ms: float = 0.0  # embedding lookup, per token

    def __post_init__(self) -> None:
        if len(self.decode_ms) != len(self.prefill_ms):
            raise ConfigError("decode_ms and prefill_ms need one entry per block")
        values = (*self.decode_ms, *self.prefill_ms, self.lm_head_ms, self.embed_ms)
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise ConfigError("compute costs must be finite and >= 0")

    def decode(self, lo: int, hi: int) -> float:
        """One token through blocks [lo, hi)."""
        return sum(self.decode_ms[lo:hi])

    def prefill(self, lo: int, hi: int, tokens: int) -> float:
        """``tokens`` prompt tokens through blocks [lo, hi)."""
        return sum(self.prefill_ms[lo:hi]) * tokens


@dataclass(frozen=True, kw_only=True)
class ModelSizes:
    """What each part of the model holds in memory."""

    param_bytes: tuple[int, ...]  # per block
    kv_bytes_per_token: tuple[int, ...]  # per block: keys and values of one position
    embed_bytes: int  # the token embeddings
    lm_head_bytes: int  # final norm + LM head beyond the embeddings (the norm alone if tied)

    def __post_init__(self) -> None:
        if len(self.param_bytes) != len(self.kv_bytes_per_token) or not self.param_bytes:
            raise ConfigError("param_bytes and kv_bytes_per_token need one entry per block")
        if min((*self.param_bytes, *self.kv_bytes_per_token, self.embed_bytes,
                self.lm_head_bytes)) < 0:
            raise ConfigError("sizes must be >= 0")

    @property
    def n_blocks(self) -> int:
        """How many decoder blocks."""
        return len(self.param_bytes)


@dataclass(frozen=True, kw_only=True)
class ModelCosts:
    """Everything the planner needs that does not depend on the link or the job."""

    sizes: ModelSizes
    edge: SideCost
    cloud: SideCost
    codec_bytes: Mapping[str, int]  # codec -> one hidden vector's message (a decode step)
    codec_agreement: Mapping[str, float] = field(default_factory=dict)  # measured top-1
    token_bytes: int = 16  # a message that carries one token id

    def __post_init__(self) -> None:
        n = self.sizes.n_blocks
        if len(self.edge.decode_ms) != n or len(self.cloud.decode_ms) != n:
            raise ConfigError(f"edge and cloud costs need {n} blocks, as the sizes have")
        if not self.codec_bytes:
            raise ConfigError("codec_bytes names no codec")
        for codec, nbytes in self.codec_bytes.items():
            parse_codec(codec)  # CodecError for a bad name
            if nbytes <= 0:
                raise ConfigError(f"codec {codec} has {nbytes} bytes per token")


@dataclass(frozen=True, kw_only=True)
class GenerationJob:
    """One generation: its prompt and how many tokens it makes."""

    prompt_tokens: int
    new_tokens: int

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.new_tokens < 1:
            raise ConfigError("a generation needs a prompt token and a new token at least")


@dataclass(frozen=True, kw_only=True)
class Constraints:
    """What the user requires of a layout."""

    edge_memory_mb: float | None = None  # None: no limit
    min_edge_blocks: int = 0  # blocks on the device before any hidden state leaves
    u_shaped: bool = False  # token ids must never leave the device
    min_agreement: float = 0.99  # a lossy codec's measured top-1 agreement, at least

    def __post_init__(self) -> None:
        if self.edge_memory_mb is not None and not self.edge_memory_mb > 0:
            raise ConfigError("edge_memory_mb must be > 0")
        if self.min_edge_blocks < 0:
            raise ConfigError("min_edge_blocks must be >= 0")
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ConfigError("min_agreement must be in [0, 1]")


@dataclass(frozen=True, kw_only=True)
class GenerationPlan:
    """One layout and codec, priced; ``rejected`` says why it may not be used."""

    cut: str  # block.K, block.K:block.M, output (all edge) or input (all cloud)
    codec: str | None  # None where no hidden state travels
    edge_blocks: int  # blocks on the device before hidden states leave it
    edge_memory_mb: float  # edge weights + its KV cache for prompt + generation
    ttft_ms: float  # time to first token
    step_ms: float  # each later token
    total_ms: float  # ttft + (new_tokens - 1) * step
    bytes_up_per_token: int  # a decode step, edge to cloud
    bytes_down_per_token: int  # a decode step, cloud to edge
    edge_ms_per_token: float  # the step's compute on the device
    network_ms_per_token: float  # transfer + RTT + queue
    cloud_ms_per_token: float  # the step's compute in the cloud
    rejected: str = ""  # "" where allowed

    @property
    def tokens_per_s(self) -> float:
        """Decode rate after the first token."""
        return 1000.0 / self.step_ms if self.step_ms > 0 else math.inf

    @property
    def label(self) -> str:
        """The cut and codec as a person reads them."""
        if self.cut == ALL_EDGE:
            return "all on device"
        if self.cut == ALL_CLOUD:
            return "all in cloud (token ids sent)"
        return f"{self.cut} {self.codec}"

    def describe(self) -> str:
        """One line: the prediction, and the reason for a rejection."""
        text = (
            f"{self.label}: TTFT {self.ttft_ms:.1f} ms, {self.tokens_per_s:.1f} tokens/s, "
            f"{self.bytes_up_per_token} B up + {self.bytes_down_per_token} B down per token, "
            f"edge memory {self.edge_memory_mb:.1f} MB, total {self.total_ms:.0f} ms"
        )
        return f"{text} -- rejected: {self.rejected}" if self.rejected else text


@dataclass(frozen=True, kw_only=True)
class PlanResult:
    """The choice, the baselines, and every alternative with its price and verdict."""

    choice: GenerationPlan | None  # None where every layout was rejected
    candidates: tuple[GenerationPlan, ...]  # all, fastest first
    job: GenerationJob
    link: LinkEstimate

    def baseline(self, cut: str) -> GenerationPlan:
        """``ALL_EDGE`` or ``ALL_CLOUD`` as priced (rejected or not)."""
        return next(c for c in self.candidates if c.cut == cut)

    def rejections(self) -> dict[str, int]:
        """How many candidates each kind of reason rejected."""
        out: dict[str, int] = {}
        for c in self.candidates:
            if c.rejected:
                kind = c.rejected.split(":")[0]
                out[kind] = out.get(kind, 0) + 1
        return out

    def describe(self, alternatives: int = 3) -> str:
        """The choice, the two baselines, and the best rejected alternatives with why."""
        lines = [
            f"prompt {self.job.prompt_tokens} tokens, {self.job.new_tokens} new, link "
            f"{self.link.up_mbit:g}/{self.link.down_mbit:g} Mbit/s, RTT {self.link.rtt_ms:.1f} ms",
            "choice: " + (self.choice.describe() if self.choice else "none: every layout "
                          "was rejected"),
        ]
        for cut in (ALL_EDGE, ALL_CLOUD):
            lines.append("baseline " + self.baseline(cut).describe())
        faster = [c for c in self.candidates if c.rejected and c.cut not in (ALL_EDGE, ALL_CLOUD)
                  and (self.choice is None or c.total_ms <= self.choice.total_ms)]
        for c in faster[:alternatives]:
            lines.append("ranked above, but " + c.describe())
        counts = ", ".join(f"{n} by {k}" for k, n in sorted(self.rejections().items()))
        if counts:
            lines.append(f"rejected: {counts}")
        return "\n".join(lines)


def _layouts(n: int, codecs: Sequence[str]) -> Iterator[tuple[str, int, int, str | None]]:
    """(cut, K, M, codec): edge blocks [0, K) and [M, n); the cloud runs [K, M)."""
    yield ALL_EDGE, n, n, None
    yield ALL_CLOUD, 0, n, None
    for codec in codecs:
        for k in range(1, n):
            yield f"block.{k}", k, n, codec
        for k in range(1, n):
            for m in range(k + 1, n):
                yield f"block.{k}:block.{m}", k, m, codec


def _codec_verdict(codec: str, costs: ModelCosts, constraints: Constraints) -> str:
    spec = parse_codec(codec)
    if spec.lossless:
        return ""
    if not spec.llm_safe:
        return f"codec: {codec} is not safe for language-model hidden states (outlier channels)"
    agreement = costs.codec_agreement.get(codec)
    if agreement is not None and agreement < constraints.min_agreement:
        return (f"codec: {codec} keeps {agreement:.1%} top-1, under the "
                f"{constraints.min_agreement:.1%} required")
    return ""


def _transfer_ms(nbytes: float, mbit: float) -> float:
    return nbytes * 8 / (mbit * 1000.0)


def _price(
    cut: str, k: int, m: int, codec: str | None, costs: ModelCosts, job: GenerationJob,
    link: LinkEstimate,
) -> GenerationPlan:
    s, e, c = costs.sizes, costs.edge, costs.cloud
    n = s.n_blocks
    p, g = job.prompt_tokens, job.new_tokens
    edge_ranges = [(0, k), (m, n)]
    positions = p + g
    if cut == ALL_CLOUD:
        memory = 0
    else:
        weights = s.embed_bytes + sum(sum(s.param_bytes[lo:hi]) for lo, hi in edge_ranges)
        if cut == ALL_EDGE or m < n:  # block.K leaves the LM head in the cloud
            weights += s.lm_head_bytes
        kv = positions * sum(sum(s.kv_bytes_per_token[lo:hi]) for lo, hi in edge_ranges)
        memory = weights + kv
    rtt = link.rtt_ms + link.queue_ms
    if cut == ALL_EDGE:
        edge_step = e.embed_ms + e.decode(0, n) + e.lm_head_ms
        ttft = e.embed_ms * p + e.prefill(0, n, p) + e.lm_head_ms
        return _plan(cut, None, n, memory, ttft, edge_step, 0.0, 0.0, 0, 0, job)
    if cut == ALL_CLOUD:
        up = _transfer_ms(costs.token_bytes, link.up_mbit)
        down = _transfer_ms(costs.token_bytes, link.down_mbit)
        cloud_step = c.embed_ms + c.decode(0, n) + c.lm_head_ms
        ttft = (_transfer_ms(costs.token_bytes * p, link.up_mbit) + rtt + c.embed_ms * p
                + c.prefill(0, n, p) + c.lm_head_ms + down)
        return _plan(cut, None, 0, memory, ttft, 0.0, up + rtt + down, cloud_step,
                     costs.token_bytes, costs.token_bytes, job)
    assert codec is not None
    hidden = costs.codec_bytes[codec]
    u_shaped = m < n
    down_bytes = hidden if u_shaped else costs.token_bytes
    # The edge's step: embeddings, its first blocks, and (U-shaped) its last blocks + head.
    edge_step = e.embed_ms + e.decode(0, k) + (e.decode(m, n) + e.lm_head_ms if u_shaped else 0)
    cloud_step = c.decode(k, m) + (0.0 if u_shaped else c.lm_head_ms)
    net_step = _transfer_ms(hidden, link.up_mbit) + rtt + _transfer_ms(down_bytes, link.down_mbit)
    # The prefill: every prompt row up; U-shaped, every row back down for the edge's tail.
    ttft = e.embed_ms * p + e.prefill(0, k, p) + _transfer_ms(hidden * p, link.up_mbit) + rtt
    ttft += c.prefill(k, m, p)
    if u_shaped:
        ttft += _transfer_ms(hidden * p, link.down_mbit) + e.prefill(m, n, p) + e.lm_head_ms
    else:
        ttft += c.lm_head_ms + _transfer_ms(costs.token_bytes, link.down_mbit)
    return _plan(cut, codec, k, memory, ttft, edge_step, net_step, cloud_step, hidden,
                 down_bytes, job)


def _plan(
    cut: str, codec: str | None, edge_blocks: int, memory: float, ttft: float, edge: float,
    net: float, cloud: float, up: int, down: int, job: GenerationJob,
) -> GenerationPlan:
    step = edge + net + cloud
    return GenerationPlan(
        cut=cut, codec=codec, edge_blocks=edge_blocks, edge_memory_mb=memory / MB,
        ttft_ms=ttft, step_ms=step, total_ms=ttft + (job.new_tokens - 1) * step,
        bytes_up_per_token=up, bytes_down_per_token=down, edge_ms_per_token=edge,
        network_ms_per_token=net, cloud_ms_per_token=cloud,
    )


def _verdict(plan: GenerationPlan, costs: ModelCosts, constraints: Constraints) -> str:
    n = costs.sizes.n_blocks
    token_ids_leave = plan.cut == ALL_CLOUD or (plan.cut != ALL_EDGE and ":" not in plan.cut)
    if constraints.u_shaped and token_ids_leave:
        what = "token ids go to the cloud" if plan.cut == ALL_CLOUD else "tokens come back from it"
        return f"privacy: U-shaped required, and here {what}"
    if plan.edge_blocks < min(constraints.min_edge_blocks, n):
        return (f"privacy: {plan.edge_blocks} blocks on the device, "
                f"{constraints.min_edge_blocks} required")
    limit = constraints.edge_memory_mb
    if limit is not None and plan.edge_memory_mb > limit:
        return f"memory: the edge needs {plan.edge_memory_mb:.1f} MB, {limit:g} MB allowed"
    return _codec_verdict(plan.codec, costs, constraints) if plan.codec else ""


def plan_generation(
    costs: ModelCosts,
    job: GenerationJob,
    link: LinkEstimate,
    constraints: Constraints | None = None,
    *,
    codecs: Sequence[str] | None = None,
) -> PlanResult:
    """Price every layout and codec, reject what the constraints forbid, pick the fastest.

    ``codecs`` limits the choice to those named (default: every codec in
    ``costs.codec_bytes``). Ties go to fewer bytes up, then to the layout listed first.
    """
    constraints = constraints or Constraints()
    names = list(costs.codec_bytes) if codecs is None else [str(parse_codec(c)) for c in codecs]
    unknown = [c for c in names if c not in costs.codec_bytes]
    if unknown:
        raise ConfigError(f"no bytes per token for codecs {unknown}; known: "
                          f"{sorted(costs.codec_bytes)}")
    priced = []
    for cut, k, m, codec in _layouts(costs.sizes.n_blocks, names):
        plan = _price(cut, k, m, codec, costs, job, link)
        priced.append(replace(plan, rejected=_verdict(plan, costs, constraints)))
    order = sorted(range(len(priced)),
                   key=lambda i: (priced[i].total_ms, priced[i].bytes_up_per_token, i))
    ranked = tuple(priced[i] for i in order)
    choice = next((p for p in ranked if not p.rejected), None)
    return PlanResult(choice=choice, candidates=ranked, job=job, link=link)


def model_sizes(config: object, *, dtype_bytes: int = 4) -> ModelSizes:
    """Parameter bytes per block and KV bytes per token per block from a transformers
    config of the Llama (``num_key_value_heads``, ``intermediate_size``) or GPT-2
    (``n_embd``, ``n_layer``) family, at ``dtype_bytes`` per value.
    """
    def get(name: str, default: object = None) -> Any:
        return getattr(config, name, default)

    h = get("hidden_size") or get("n_embd")
    n = get("num_hidden_layers") or get("n_layer")
    vocab = get("vocab_size")
    if not (isinstance(h, int) and isinstance(n, int) and isinstance(vocab, int)):
        raise ConfigError("config lacks hidden size, layer count or vocabulary size")
    heads = get("num_attention_heads") or get("n_head") or 1
    kv_heads = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or h // heads
    tied = bool(get("tie_word_embeddings", True))
    if get("n_embd"):  # GPT-2: fused qkv, 4h MLP, two LayerNorms, biases
        inner = get("n_inner") or 4 * h
        per_block = 4 * h * h + 4 * h + 2 * h * inner + inner + h + 4 * h
        embed = vocab * h + (get("n_positions") or 0) * h
        head = 2 * h + (0 if tied else vocab * h)
    else:  # Llama family: q, k, v, o, gate/up/down, two RMSNorms
        inter = get("intermediate_size") or 4 * h
        q_o = 2 * h * heads * head_dim
        k_v = 2 * h * kv_heads * head_dim
        per_block = q_o + k_v + 3 * h * inter + 2 * h
        embed = vocab * h
        head = h + (0 if tied else vocab * h)
    kv = 2 * kv_heads * head_dim * dtype_bytes
    return ModelSizes(
        param_bytes=(per_block * dtype_bytes,) * n,
        kv_bytes_per_token=(kv,) * n,
        embed_bytes=embed * dtype_bytes,
        lm_head_bytes=head * dtype_bytes,
    )


def measure_side_cost(
    model: Any,
    num_layers: int,
    *,
    prompt_tokens: int = 32,
    steps: int = 8,
    runs: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> SideCost:
    """Time a transformers causal LM on this machine: a prefill of ``prompt_tokens`` and
    ``steps`` decode steps after it (medians over ``runs``, after one warm-up), and its LM
    head on one vector; the blocks' share is spread evenly over ``num_layers`` (a
    decoder's blocks are identical in shape). Run under the thread count the side uses.
    """
    import torch
    from transformers import DynamicCache

    takes_cache = "cache" in inspect.signature(model.forward).parameters
    vocab = int(model.config.vocab_size)
    device = next(model.parameters()).device
    ids = (torch.arange(prompt_tokens, device=device) * 7919 % vocab).unsqueeze(0)
    # A GPU runs asynchronously: wait for it before each reading of the clock.
    sync: Callable[[], None] = (
        torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    )

    def run_once() -> tuple[float, float]:
        cache = DynamicCache(config=model.config)
        kw = {"cache" if takes_cache else "past_key_values": cache, "use_cache": True}
        sync()
        t0 = clock()
        out = model(ids, logits_to_keep=1, **kw)
        nxt = out.logits[:, -1:].argmax(-1)
        sync()
        prefill = clock() - t0
        times = []
        for _ in range(steps):
            t0 = clock()
            out = model(nxt, **kw)
            nxt = out.logits[:, -1:].argmax(-1)
            sync()
            times.append(clock() - t0)
        return prefill, statistics.median(times)

    with torch.inference_mode():
        run_once()
        samples = [run_once() for _ in range(runs)]
        head = model.get_output_embeddings()
        vec = torch.zeros(1, 1, head.in_features, device=device)
        head(vec)
        head_times = []
        for _ in range(runs * 4):
            sync()
            t0 = clock()
            head(vec)
            sync()
            head_times.append(clock() - t0)
    head_ms = 1000 * statistics.median(head_times)
    prefill_ms = 1000 * statistics.median(p for p, _ in samples)
    decode_ms = 1000 * statistics.median(d for _, d in samples)
    per_block_decode = max(decode_ms - head_ms, 0.0) / num_layers
    per_block_prefill = max(prefill_ms - head_ms, 0.0) / num_layers / prompt_tokens
    return SideCost(
        decode_ms=(per_block_decode,) * num_layers,
        prefill_ms=(per_block_prefill,) * num_layers,
        lm_head_ms=head_ms,
    )


PROFILE_MAX_MS = 3_600_000.0  # a published cost above an hour is not a measurement


def profile_to_pb(side: SideCost, method: str) -> gpb.GenerationProfile:
    """``side`` as the server publishes it in ``GenerationModel.profile``."""
    return gpb.GenerationProfile(
        decode_ms=list(side.decode_ms), prefill_ms=list(side.prefill_ms),
        lm_head_ms=side.lm_head_ms, embed_ms=side.embed_ms, method=method,
    )  # fmt: skip


def profile_from_pb(pb: gpb.GenerationProfile, num_layers: int) -> SideCost:
    """A server's published profile as a ``SideCost``, checked: one entry per block,
    every value finite, >= 0 and under an hour. ``ProtocolError`` otherwise.
    """
    if len(pb.decode_ms) != num_layers or len(pb.prefill_ms) != num_layers:
        raise ProtocolError(
            f"the server's generation profile has {len(pb.decode_ms)} decode and "
            f"{len(pb.prefill_ms)} prefill entries for a model of {num_layers} blocks"
        )
    values = (*pb.decode_ms, *pb.prefill_ms, pb.lm_head_ms, pb.embed_ms)
    if not all(math.isfinite(v) and 0 <= v <= PROFILE_MAX_MS for v in values):
        raise ProtocolError("the server's generation profile has a cost that is not "
                            f"a number of milliseconds in [0, {PROFILE_MAX_MS:.0f}]")
    return SideCost(decode_ms=tuple(pb.decode_ms), prefill_ms=tuple(pb.prefill_ms),
                    lm_head_ms=pb.lm_head_ms, embed_ms=pb.embed_ms)


AUTO_CODECS = ("raw", "fp16", "int8o:8")  # lossless, half, and the int8 the table backs


def auto_costs(
    model: Any,
    num_layers: int,
    hidden_size: int,
    *,
    codecs: Sequence[str] = AUTO_CODECS,
    cloud: SideCost | None = None,
    cloud_speedup: float | None = None,
    prompt_tokens: int = 32,
) -> ModelCosts:
    """Costs for ``--cut auto``: this machine's timing of ``model`` as the edge; the
    cloud's from ``cloud`` (the server's published profile) unless ``cloud_speedup`` is
    given, which prices the cloud that many times faster than this edge (1 with
    neither); sizes from the model's config and each codec's real message for one
    hidden vector.
    """
    import torch

    from splitnet.codecs import encode

    if cloud_speedup is not None and not (math.isfinite(cloud_speedup) and cloud_speedup > 0):
        raise ConfigError("cloud_speedup must be a number > 0")
    edge = measure_side_cost(model, num_layers, prompt_tokens=prompt_tokens)
    if cloud is None or cloud_speedup is not None:
        speedup = cloud_speedup or 1.0
        cloud = SideCost(
            decode_ms=tuple(t / speedup for t in edge.decode_ms),
            prefill_ms=tuple(t / speedup for t in edge.prefill_ms),
            lm_head_ms=edge.lm_head_ms / speedup,
            embed_ms=edge.embed_ms / speedup,
        )
    vector = torch.randn(1, 1, hidden_size, generator=torch.Generator().manual_seed(0))
    codec_bytes = {str(parse_codec(c)): encode(vector, c).ByteSize() + 16 for c in codecs}
    return ModelCosts(sizes=model_sizes(model.config), edge=edge, cloud=cloud,
                      codec_bytes=codec_bytes)
