"""Checks every actor applies: query envelopes, replays, signed payloads, compact byte lists."""

from __future__ import annotations

import base64
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Generic, TypeVar

from dispers.core.codec import dumps, dumps_strings, hex_bytes, loads_object, loads_strings
from dispers.core.config import ClusterSettings, Roster, RosterEntry
from dispers.core.errors import DispersError, ErrorCode, malformed
from dispers.core.ids import Role, check_batch_id, check_query_id
from dispers.core.messages import BatchHeader, QueryEnvelope, SubscriptionOp, digest, receipt_bytes
from dispers.core.spec import Privacy
from dispers.core.wire import pad, padded_size, unpad
from dispers.crypto import Opener, seal
from dispers.crypto.box import seal_many, sealed_size
from dispers.crypto.keys import SealingPublicKey, SigningKeyPair, VerifyKey

CLOCK_SKEW_S = 60.0
T = TypeVar("T")


class Staging(Generic[T]):
    """Writes held back until the Conductor settles their batch (commit or drop).

    A subscription batch touches CI, T and TF; staging the writes of CI and T until TF has
    applied the batch means a batch refused anywhere leaves nothing behind anywhere.
    Unsettled batches expire after `ttl_s`.
    """

    def __init__(self, ttl_s: float) -> None:
        self._ttl = ttl_s
        self._pending: dict[str, tuple[float, T]] = {}
        self._lock = threading.Lock()

    def put(self, batch_id: str, value: T) -> None:
        """Hold `value` for `batch_id`; a batch id may be staged once."""
        check_batch_id(batch_id)
        now = time.monotonic()
        with self._lock:
            for key in [k for k, (at, _) in self._pending.items() if now - at > self._ttl]:
                del self._pending[key]
            if batch_id in self._pending:
                raise DispersError(ErrorCode.REPLAY, "subscription batch id already staged")
            self._pending[batch_id] = (now, value)

    def take(self, batch_id: str) -> T | None:
        """Remove and return what `batch_id` staged (None if nothing or expired)."""
        check_batch_id(batch_id)
        with self._lock:
            item = self._pending.pop(batch_id, None)
        return None if item is None else item[1]

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)


def replay_memory_s(settings: ClusterSettings) -> float:
    """How long an id must be remembered: as long as anything bearing it can still be valid
    (dated up to CLOCK_SKEW_S ahead, accepted until max_query_age_s after), with a margin."""
    return 2 * (settings.max_query_age_s + CLOCK_SKEW_S)


class ReplayGuard:
    """Remembers ids for a while; a second use of one is a replay.

    The memory is in this process only, so it refuses anything made before the process
    started: after a restart it could not tell a replay from a first use.
    """

    def __init__(self, ttl_s: float, max_entries: int = 1_000_000) -> None:
        self.started = time.time()
        self._ttl = ttl_s
        self._max = max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def _expire(self, now: float) -> None:
        while self._seen:
            key, at = next(iter(self._seen.items()))
            if now - at <= self._ttl and len(self._seen) <= self._max:
                break
            self._seen.pop(key)

    def claim(self, key: str, what: str, *, made_at: float | None = None) -> None:
        """Check and record `key` in one step: of two concurrent uses, exactly one succeeds.

        `made_at` (the query's creation time): refused if before this process started.
        """
        if made_at is not None and made_at < self.started:
            raise DispersError(
                ErrorCode.EXPIRED, f"{what} was made before this actor started: it cannot rule out a replay"
            )
        with self._lock:
            self._expire(time.time())
            if key in self._seen:
                raise DispersError(ErrorCode.REPLAY, f"{what} was already processed (replay)")
            self._seen[key] = time.time()


def verify_envelope(
    envelope: QueryEnvelope, roster: Roster, settings: ClusterSettings, *, now: float | None = None
) -> RosterEntry:
    """Check a query: known querier, its keys, signature, age, k and plan. Returns Q's entry."""
    check_query_id(envelope.query_id)
    querier = roster.require(envelope.querier, Role.QUERIER)
    if (
        querier.verify_key != envelope.querier_verify_key
        or querier.sealing_key != envelope.querier_sealing_key
    ):
        raise DispersError(ErrorCode.UNAUTHORIZED, "the query's keys do not match its querier's roster entry")
    querier.verify_key.verify(envelope.signing_bytes(), envelope.signature, "query")
    now = time.time() if now is None else now
    if now - envelope.created_at > settings.max_query_age_s:
        raise DispersError(ErrorCode.EXPIRED, "the query is older than the cluster allows")
    if envelope.created_at - now > CLOCK_SKEW_S:
        raise DispersError(ErrorCode.EXPIRED, "the query is dated in the future")
    if envelope.k < settings.k_min:
        raise malformed(f"the query's k is below the cluster minimum k={settings.k_min}")
    roster.check_plan(envelope.plan)
    check_envelope_sizes(envelope, settings)
    return querier


EXACT_ONLY_STATS = ("min", "max")
"""Statistics that release one person's value: refused while the cluster's policy is DP."""


def check_privacy(privacy: Privacy, stats: Sequence[str], settings: ClusterSettings, *, what: str) -> None:
    """A query's privacy parameters against the cluster's policy (checked by Q before sealing
    and again by the root DA): within the per-query maxima, and no min or max under DP."""
    if not settings.dp:
        return
    if privacy.epsilon > settings.max_epsilon:
        raise malformed(
            f"{what}: privacy.epsilon is above the cluster's per-query maximum {settings.max_epsilon:g}"
        )
    if privacy.delta > settings.max_delta:
        raise malformed(
            f"{what}: privacy.delta is above the cluster's per-query maximum {settings.max_delta:g}"
        )
    exact = [s for s in stats if s in EXACT_ONLY_STATS]
    if exact:
        raise malformed(
            f"{what}: {', '.join(exact)} release one person's value and are refused under differential "
            "privacy (the cluster's policy); ask for quantiles from a histogram instead"
        )


def frame_size(size: int) -> int:
    """The length of a box sealing a payload padded to `size` bytes."""
    return sealed_size(padded_size(size))


def check_envelope_sizes(envelope: QueryEnvelope, settings: ClusterSettings) -> None:
    """Every sealed part of a query has the cluster's fixed length: checked before opening any,
    so an oversized part costs nothing, and a length can never vary with what is inside."""
    parts = [
        ("concepts", envelope.sealed_concepts, settings.concepts_bytes),
        ("expression", envelope.sealed_expression, settings.expression_bytes),
        ("data request", envelope.sealed_request, settings.request_bytes),
        *((f"aggregate spec for {name}", ct, settings.spec_bytes) for name, ct in envelope.sealed_specs),
    ]
    for what, ciphertext, size in parts:
        if len(ciphertext) != frame_size(size):
            raise malformed(f"the query's sealed {what} does not have the cluster's fixed length")
    if sorted(name for name, _ in envelope.sealed_specs) != sorted(envelope.plan.members):
        raise malformed("the query must carry exactly one aggregate spec per aggregator of its plan")


def sign_payload(signing: SigningKeyPair, signer: str, body: dict[str, Any]) -> bytes:
    """Wrap a JSON body with the signer's name and Ed25519 signature (sealed boxes are anonymous)."""
    raw = dumps(body)
    sig = signing.sign(b"dispers-signed-v1\x00" + signer.encode() + b"\x00" + raw)
    # The wrapper holds only text (the body's canonical JSON, which is ASCII, a name and a hex
    # signature): orjson writes the same bytes as the standard library, several times faster on
    # a model-sized body, and nobody signs the wrapper itself.
    return dumps_strings({"body": raw.decode(), "signer": signer, "sig": sig.hex()})


def open_signed(payload: bytes, expected_signer: str, key: VerifyKey, what: str) -> dict[str, Any]:
    """Check a signed payload came from `expected_signer` and return its body."""
    outer = loads_strings(payload, what)
    if outer.get("signer") != expected_signer or not isinstance(outer.get("body"), str):
        raise DispersError(ErrorCode.BAD_SIGNATURE, f"{what}: not signed by the expected actor")
    raw = outer["body"].encode()
    sig = hex_bytes(outer.get("sig"), f"{what} signature", 64)
    key.verify(b"dispers-signed-v1\x00" + expected_signer.encode() + b"\x00" + raw, sig, what)
    return loads_object(raw, what)


def seal_padded(recipient: SealingPublicKey, obj: dict[str, Any], size: int, what: str) -> bytes:
    """Seal a JSON object inside a fixed frame of `size` bytes (its length says nothing)."""
    return seal(recipient, pad(dumps(obj), size, what))


def open_padded(opener: Opener, ciphertext: bytes, size: int, what: str) -> dict[str, Any]:
    """Open a box sealed with seal_padded."""
    return loads_object(unpad(opener.open(ciphertext, what), size, what), what)


def seal_padded_strings(
    recipient: SealingPublicKey, obj: Mapping[str, str | Sequence[str]], size: int, what: str
) -> bytes:
    """seal_padded for a payload of text and lists of text (a subscription's), encoded by orjson."""
    return seal(recipient, pad(dumps_strings(obj), size, what))


def open_padded_strings(opener: Opener, ciphertext: bytes, size: int, what: str) -> dict[str, Any]:
    """Open a box sealed with seal_padded_strings."""
    return loads_strings(unpad(opener.open(ciphertext, what), size, what), what)


def open_padded_strings_many(
    opener: Opener, ciphertexts: Sequence[bytes], size: int, what: str
) -> list[dict[str, Any]]:
    """open_padded_strings of each box of a batch (across the crypto pool where one is
    installed); `what` holds "{i}" for the item's index. The first box that does not open fails
    the batch with the error opening it alone gives."""
    opened = opener.open_many(ciphertexts, what.replace(" {i}", ""))
    out = []
    for i, plaintext in enumerate(opened):
        item = what.format(i=i)
        if plaintext is None:
            opener.open(ciphertexts[i], item)  # raises its BAD_CIPHERTEXT
            raise malformed(f"{item} does not open")  # (only if it opened the second time)
        out.append(loads_strings(unpad(plaintext, size, item), item))
    return out


def seal_padded_strings_many(
    recipient: SealingPublicKey, objs: Sequence[Mapping[str, str | Sequence[str]]], size: int, what: str
) -> list[bytes]:
    """seal_padded_strings of each payload of a batch (across the crypto pool where one is installed)."""
    return seal_many(recipient, [pad(dumps_strings(obj), size, what) for obj in objs])


def seal_signed(
    recipient: SealingPublicKey,
    signing: SigningKeyPair,
    signer: str,
    body: dict[str, Any],
    size: int,
    what: str,
) -> bytes:
    """Sign a JSON body (sealed boxes are anonymous), frame it to `size` bytes and seal it."""
    return seal(recipient, pad(sign_payload(signing, signer, body), size, what))


def open_sealed_signed(
    opener: Opener, ciphertext: bytes, size: int, signer: str, key: VerifyKey, what: str
) -> dict[str, Any]:
    """Open a box sealed with seal_signed and check who signed it."""
    return open_signed(unpad(opener.open(ciphertext, what), size, what), signer, key, what)


def pack(items: Sequence[bytes], size: int) -> str:
    """Fixed-size byte strings as one base64 string (compact for a million pseudonyms)."""
    if any(len(x) != size for x in items):
        raise ValueError("items of the wrong size")
    return base64.b64encode(b"".join(items)).decode()


def unpack(value: object, size: int, what: str) -> list[bytes]:
    """Inverse of pack, with a clear error."""
    if not isinstance(value, str):
        raise malformed(f"{what} is not a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raise malformed(f"{what} is not valid base64") from None
    if len(raw) % size:
        raise malformed(f"{what} is not a whole number of {size}-byte items")
    return [raw[i : i + size] for i in range(0, len(raw), size)]


def same_query(obj: dict[str, Any], envelope: QueryEnvelope, what: str) -> None:
    """A sealed payload must belong to the query it travels with (no swapping between queries)."""
    if obj.get("query_id") != envelope.query_id:
        raise malformed(f"{what} belongs to another query")


def check_batch(
    header: BatchHeader,
    roster: Roster,
    settings: ClusterSettings,
    ciphertexts: Sequence[bytes],
    signed: Sequence[bytes],
    *,
    item_size: int,
    now: float | None = None,
) -> RosterEntry:
    """CI's and T's checks on a subscription batch: signed by a host of the roster, fresh, and
    made of exactly the ciphertexts the host signed (`signed`: their digests), each once."""
    host = roster.require(header.host, Role.PERSONAL_CLOUD)
    if len(header.concept_digests) != len(header.address_digests):
        raise malformed("the subscription batch header is malformed")
    if not 0 < len(header) <= settings.batch_size:
        raise malformed(f"a subscription batch holds 1 to {settings.batch_size} items")
    host.verify_key.verify(header.signing_bytes(), header.signature, "subscription batch")
    now = time.time() if now is None else now
    if now - header.issued_at > settings.max_query_age_s or header.issued_at - now > CLOCK_SKEW_S:
        raise DispersError(ErrorCode.EXPIRED, "the subscription batch is stale or dated in the future")
    if len(ciphertexts) != len(signed):
        raise malformed("the subscription batch has items its host did not sign")
    if any(len(c) != item_size for c in ciphertexts):
        raise malformed("a subscription item does not have the cluster's fixed length")
    if sorted(digest(c) for c in ciphertexts) != sorted(signed):
        raise malformed("the subscription batch has items its host did not sign")
    return host


def check_receipt(roster: Roster, batch_id: str, op: SubscriptionOp, receipt: bytes) -> None:
    """TF's signature that it applied `batch_id` with `op` (BAD_SIGNATURE otherwise)."""
    tf = roster.one(Role.TARGET_FINDER)
    tf.verify_key.verify(receipt_bytes(batch_id, op), receipt, "subscription receipt")


def signed_tokens_bytes(settings: ClusterSettings) -> int:
    """The frame of a query's token list signed by CI (the signed wrapper escapes the JSON)."""
    return 2 * tokens_bytes(settings) + 512


def take_to_commit(
    staging: Staging[tuple[SubscriptionOp, T]], roster: Roster, batch_id: str, commit: bool, receipt: bytes
) -> tuple[SubscriptionOp, T] | None:
    """What CI or T staged for a batch (and its op), when the Conductor settles it: None to drop it; to commit
    it, TF's signed receipt for this batch id and op is required (the Conductor cannot have a
    batch TF refused committed), and something must still be staged."""
    staged = staging.take(batch_id)
    if not commit:
        return None
    if staged is None:
        raise DispersError(
            ErrorCode.FAILED_PRECONDITION, "nothing is staged for this subscription batch (expired?)"
        )
    check_receipt(roster, batch_id, staged[0], receipt)
    return staged


def tokens_bytes(settings: ClusterSettings) -> int:
    """The fixed frame of a token list: max_concepts hex tokens, a nonce or a query id."""
    return 70 * settings.max_concepts + 128
