"""Generation sessions on the server: the table, its limits, and what each session holds.

Capacity is decided at open, never in the middle of a chat: a session reserves KV
memory for all the tokens it may hold (``max_tokens`` x its blocks' bytes per token),
and is refused with RESOURCE_EXHAUSTED, saying which limit and what to ask for, when
the sessions, the per-session token limit or the KV budget cannot take it. A session
that closes, idles past the timeout, or whose stream drops is removed and its cache
dropped at once. The clock is injected, so timeouts are tested without waiting.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch

from cloud.job import RequestError
from splitnet.codecs import CodecSpec
from splitnet.errors import ConfigError
from splitnet.llm import BlockCut, LanguageModel, Sampling
from splitnet.llm.halves import CloudHalf, KVState
from splitnet.v1 import generation_pb2 as gpb

__all__ = ["ServedLM", "Session", "SessionLimits", "SessionTable"]

logger = logging.getLogger(__name__)

RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass(frozen=True, kw_only=True)
class SessionLimits:
    """What the generation service allows, per session and in aggregate."""

    max_sessions: int = 32  # sessions open at once
    max_tokens: int = 2048  # prompt + generated tokens one session may hold
    kv_budget_bytes: int = 1 << 30  # KV cache all sessions may reserve together
    idle_timeout_s: float = 60.0  # a session with no message for this long is ended
    max_batch_size: int = 8  # decode steps of different sessions run as one call

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_tokens", "kv_budget_bytes", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"generation limit {name} must be at least 1")
        if self.idle_timeout_s <= 0:
            raise ConfigError("generation idle timeout must be > 0")

    def to_pb(self) -> gpb.GenerationLimits:
        """The wire form, as GetGenerationInfo and Opened report it."""
        return gpb.GenerationLimits(
            max_sessions=self.max_sessions,
            max_tokens_per_session=self.max_tokens,
            kv_budget_bytes=self.kv_budget_bytes,
            idle_timeout_s=self.idle_timeout_s,
            max_batch_size=self.max_batch_size,
        )


class ServedLM:
    """A language model the server serves, with its cloud halves built once per cut.

    The server keeps every block, since a client may open any cut; each half references
    only the blocks (and head) of its own cut.
    """

    def __init__(self, lm: LanguageModel, device: str = "cpu") -> None:
        self.lm = lm
        self.name = lm.name
        self.device = device
        if device != "cpu":
            torch.nn.Module.to(lm.model, torch.device(device))
        self.fingerprint = lm.fingerprint  # at load, so no session waits for it
        self.profile: gpb.GenerationProfile | None = None  # set by measure_profile()
        self._halves: dict[BlockCut, CloudHalf] = {}
        self._lock = threading.Lock()

    def half(self, cut: BlockCut) -> CloudHalf:
        """The cloud half at ``cut`` (built on first use)."""
        with self._lock:
            half = self._halves.get(cut)
            if half is None:
                half = self._halves[cut] = CloudHalf(self.lm, cut)
            return half

    def measure_profile(self, runs: int, prompt_tokens: int = 32, steps: int = 8) -> None:
        """Time the model here (``splitnet.llm.plan.measure_side_cost``: a prefill of
        ``prompt_tokens`` and ``steps`` decode steps per run, the median of ``runs`` after
        a warm-up) and publish it in ``GenerationModel.profile``. Call before serving.
        """
        from splitnet.llm.plan import measure_side_cost, profile_to_pb

        side = measure_side_cost(self.lm.model, self.lm.num_layers, prompt_tokens=prompt_tokens,
                                 steps=steps, runs=runs)
        self.profile = profile_to_pb(
            side,
            f"median of {runs} runs ({prompt_tokens}-token prefill, {steps} decode steps) "
            "after 1 warm-up, "
            f"on {self.device}, {torch.get_num_threads()} threads; whole model, spread "
            "evenly over the blocks",
        )

    def kv_bytes_per_token(self, cut: BlockCut) -> int:
        """K+V bytes one token costs in the server's blocks at ``cut``."""
        return self.lm.kv_bytes_per_token(len(cut.cloud_blocks(self.lm.num_layers)))

    def to_pb(self) -> gpb.GenerationModel:
        """The wire description."""
        lm = self.lm
        return gpb.GenerationModel(
            name=lm.name,
            num_layers=lm.num_layers,
            hidden_size=lm.hidden_size,
            vocab_size=int(lm.model.config.vocab_size),
            kv_bytes_per_token_per_layer=lm.kv_bytes_per_token(1),
            tied_embeddings=lm.tied_embeddings,
            eos_token_ids=list(lm.eos_token_ids),
            fingerprint=self.fingerprint,
            profile=self.profile,
        )


@dataclass(eq=False)
class Session:
    """One open generation session: its half, its cache and its reservation."""

    id: str
    model: ServedLM
    cut: BlockCut
    half: CloudHalf
    codec: CodecSpec
    sampling: Sampling
    max_tokens: int  # granted
    reserved_bytes: int  # KV bytes reserved for max_tokens
    last_seen: float  # the table's clock at the last message
    state: KVState = field(default_factory=KVState)
    # The previous message's (position, tokens) and its answer, for idempotent retries.
    last: tuple[int, int, gpb.GenerateResponse] | None = None
    closed: bool = False
    end_reason: str = ""  # why it was removed: "closed", "idle", "dropped"

    @property
    def length(self) -> int:
        """Tokens the session holds."""
        return self.state.length


class SessionTable:
    """Every open session, the limits they share, and how much KV memory they use."""

    def __init__(
        self, limits: SessionLimits, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def open(
        self,
        model: ServedLM,
        cut: BlockCut,
        codec: CodecSpec,
        sampling: Sampling,
        max_tokens: int,
    ) -> Session:
        """Admit a session, or raise ``RequestError(RESOURCE_EXHAUSTED)`` saying why."""
        lim = self.limits
        wanted = max_tokens or lim.max_tokens
        if wanted > lim.max_tokens:
            raise RequestError(
                RESOURCE_EXHAUSTED,
                f"max_tokens {wanted} is over this server's limit of {lim.max_tokens} tokens "
                f"per session: ask for at most {lim.max_tokens} (prompt + new tokens)",
            )
        per_token = model.kv_bytes_per_token(cut)
        need = wanted * per_token
        with self._lock:
            if len(self._sessions) >= lim.max_sessions:
                raise RequestError(
                    RESOURCE_EXHAUSTED,
                    f"all {lim.max_sessions} generation sessions are in use: retry later, "
                    "or close sessions you no longer need",
                )
            reserved = sum(s.reserved_bytes for s in self._sessions.values())
            free = lim.kv_budget_bytes - reserved
            if need > free:
                fits = free // per_token if per_token else 0
                raise RequestError(
                    RESOURCE_EXHAUSTED,
                    f"KV memory: {wanted} tokens at {cut.name} need {need} bytes "
                    f"({per_token} per token) but {max(free, 0)} of the {lim.kv_budget_bytes}-"
                    f"byte budget are free: ask for at most {fits} tokens, cut later "
                    "(fewer blocks on the server), or retry when sessions end",
                )
            session = Session(
                id=f"s{next(self._ids)}",
                model=model,
                cut=cut,
                half=model.half(cut),
                codec=codec,
                sampling=sampling,
                max_tokens=wanted,
                reserved_bytes=need,
                last_seen=self.clock(),
            )
            self._sessions[session.id] = session
        logger.debug("session %s opened: %s at %s", session.id, model.name, cut.name)
        return session

    def touch(self, session: Session) -> None:
        """Note a message from the session's client (resets its idle clock)."""
        session.last_seen = self.clock()

    def end(self, session: Session, reason: str) -> None:
        """Remove the session and drop its cache (idempotent)."""
        with self._lock:
            if self._sessions.pop(session.id, None) is None:
                return
        session.closed = True
        session.end_reason = reason
        session.state = KVState()  # the K/V tensors go with the old state
        session.last = None
        logger.debug("session %s ended: %s", session.id, reason)

    def expire(self) -> list[Session]:
        """End every session idle past the timeout; returns them."""
        now = self.clock()
        with self._lock:
            idle = [
                s for s in self._sessions.values() if now - s.last_seen > self.limits.idle_timeout_s
            ]
        for s in idle:
            self.end(s, "idle")
        return idle

    def idle_left_s(self, session: Session) -> float:
        """Seconds until ``session`` times out."""
        return self.limits.idle_timeout_s - (self.clock() - session.last_seen)

    def __len__(self) -> int:
        return len(self._sessions)

    def sessions(self) -> list[Session]:
        """The open sessions."""
        with self._lock:
            return list(self._sessions.values())

    @property
    def kv_used_bytes(self) -> int:
        """Bytes the open sessions' caches hold now."""
        return sum(s.state.nbytes() for s in self.sessions())

    def capacity(self) -> gpb.Capacity:
        """Sessions and KV memory, reserved, used and free."""
        sessions = self.sessions()
        reserved = sum(s.reserved_bytes for s in sessions)
        return gpb.Capacity(
            sessions_open=len(sessions),
            sessions_free=max(self.limits.max_sessions - len(sessions), 0),
            kv_reserved_bytes=reserved,
            kv_free_bytes=max(self.limits.kv_budget_bytes - reserved, 0),
            kv_used_bytes=sum(s.state.nbytes() for s in sessions),
        )
