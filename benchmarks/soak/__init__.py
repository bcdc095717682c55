"""The reliability suite: hostile input, load, faults and auth against a real server.

Every part runs ``splitnet-cloud`` as a subprocess on 127.0.0.1 (so a crash is a dead
process, resident memory is the server's own, and SIGKILL is real) and talks to it
with real gRPC clients:

- **fuzz**: hostile ``InferRequest``s and streams (random bytes, wrong wire types,
  mutated and truncated messages, absurd shapes, lying sizes, unknown dtypes, zstd
  bombs, broken codec steps, NaN payloads, unknown names, oversized messages, chunked
  streams that lie, stop half-way or are abandoned). Each message has the set of
  status codes a correct server may answer; anything else (INTERNAL, UNKNOWN, a code
  outside the set, a dead process) is counted. Every ``probe_every`` messages a valid
  request must come back correct, so "still serving" means "still right".
- **load**: concurrent ``EdgeClient``s on mixed cuts and codecs, unary and streamed;
  every output is compared with the unsplit model (tolerance per codec), none may be
  lost.
- **faults**: the server is SIGKILLed under load and restarted on the same port; each
  request must end correct, or with a clear error, or in a marked local fallback.
- **stall**: many unauthenticated streams announce a large chunked frontier, send part
  of it and stall; resident memory (before, peak, after) against the server's budget,
  and a legitimate client's answers meanwhile.
- **attacks**: issue 13's attacks (health Watch names, huge repeated fields, codec
  specs, a long zstd level, long strings, unauthenticated bodies, tiny chunks, idle
  metrics connections, a token-file comment) and issue 11's stalled chunks, each with
  its figure: memory before, peak and after, the slowest legitimate answer, the codes
  (``attacks``; ``tests/test_attacks.py`` runs them at test size).
- **auth**: no token, a wrong token, a client certificate from another CA and an
  expired one are each refused by a token + mTLS server; the right ones pass.

``python -m benchmarks.soak`` (``make soak``) runs the long version and prints a table;
``tests/test_reliability.py`` runs short versions of the same functions.

Modules, one part each: ``server`` (the subprocess), ``reference`` (the local model and
valid requests), ``cases`` (hostile messages), ``fuzz``, ``load``, ``faults``, ``stall``,
``attacks``, ``auth``,
and ``report`` (the command: runs them long, prints the table, writes JSON).
"""

from benchmarks.soak.auth import AuthReport, auth
from benchmarks.soak.cases import PROPER, REFUSED, Case, Hostile, stream_message
from benchmarks.soak.faults import FaultReport, faults
from benchmarks.soak.fuzz import FuzzReport, fuzz, send_case
from benchmarks.soak.load import LoadReport, edge_client, load
from benchmarks.soak.reference import MIX, MODEL, SERVICE, TOLERANCE, Reference, tolerance
from benchmarks.soak.report import main
from benchmarks.soak.server import Server
from benchmarks.soak.stall import StallReport, stall

__all__ = [
    "MIX",
    "MODEL",
    "PROPER",
    "REFUSED",
    "SERVICE",
    "TOLERANCE",
    "AuthReport",
    "Case",
    "FaultReport",
    "FuzzReport",
    "Hostile",
    "LoadReport",
    "Reference",
    "Server",
    "StallReport",
    "auth",
    "edge_client",
    "faults",
    "fuzz",
    "load",
    "main",
    "send_case",
    "stall",
    "stream_message",
    "tolerance",
]
