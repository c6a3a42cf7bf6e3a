"""Target: pseudonym -> address directory; asks targets for contributions, forwards them to DAs."""

from __future__ import annotations

import base64
import logging
import secrets
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from dispers.core.codec import field, hex_bytes, loads_object
from dispers.core.config import ClusterSettings, Roster
from dispers.core.errors import DispersError, ErrorCode, malformed
from dispers.core.ids import Role
from dispers.core.messages import (
    CollectReport,
    ContributionRequest,
    QueryEnvelope,
    SubscriptionOp,
    request_signing_bytes,
)
from dispers.core.spec import DataRequest
from dispers.crypto import ActorKeys, Opener, keyed_hash, seal
from dispers.protocol.api import Peers
from dispers.protocol.common import ReplayGuard, Staging, same_query, unpack, verify_envelope
from dispers.state.directory import AddressDirectory

log = logging.getLogger(__name__)
MAX_ADDRESS = 256


def split_address(address: str) -> tuple[str, str]:
    """An address is '<host>/<instance id>'."""
    host, sep, instance = address.partition("/")
    if not sep or not host or not instance:
        raise malformed("an address must be '<host>/<instance id>'")
    return host, instance


class Target:
    """T learns target addresses and the data request; never concepts, expression or values."""

    def __init__(
        self,
        keys: ActorKeys,
        roster: Roster,
        settings: ClusterSettings,
        directory: AddressDirectory,
        peers: Peers,
    ) -> None:
        self.name = keys.name
        self._secret = keys.secret
        self._opener = Opener(keys.name, keys.sealing)
        self._roster = roster
        self._settings = settings
        self._directory = directory
        self._peers = peers
        self._tf_key = roster.one(Role.TARGET_FINDER).sealing_key
        self._hosts = {e.name for e in roster.by_role(Role.PERSONAL_CLOUD)}
        self._replays = ReplayGuard(settings.max_query_age_s * 2)
        self._staged: Staging[list[tuple[bytes, str]]] = Staging(settings.query_timeout_s)
        self._random = secrets.SystemRandom()

    def pseudonym(self, address: str) -> bytes:
        """Keyed PRF of an address under T's secret: stable, so re-subscribing changes nothing."""
        return keyed_hash(self._secret, address.encode(), b"dispers-address")

    def pseudonymize(
        self, op: SubscriptionOp, sealed_addresses: Sequence[bytes], batch_id: str
    ) -> list[bytes]:
        """Open each address and return seal_TF(pseudonym); on subscribe, stage the entry.

        The directory is written only when the Conductor settles the batch with commit=True.
        """
        entries: list[tuple[bytes, str]] = []
        for i, ciphertext in enumerate(sealed_addresses):
            what = f"subscription {i} address"
            raw = self._opener.open(ciphertext, what)
            try:
                address = raw.decode()
            except UnicodeDecodeError:
                raise malformed(f"{what} is not UTF-8") from None
            if len(address) > MAX_ADDRESS:
                raise malformed(f"{what} is longer than {MAX_ADDRESS} characters")
            host, _ = split_address(address)
            if host not in self._hosts:
                raise malformed(f"{what} names no personal-cloud host of the roster")
            entries.append((self.pseudonym(address), address))
        if op is SubscriptionOp.SUBSCRIBE:
            self._staged.put(batch_id, entries)
        return [seal(self._tf_key, p) for p, _ in entries]

    def settle(self, batch_id: str, commit: bool) -> None:
        """Commit (or drop) the directory entries a subscription batch staged."""
        entries = self._staged.take(batch_id)
        if commit and entries:
            self._directory.put_many(entries)

    def _open_request(self, envelope: QueryEnvelope) -> tuple[DataRequest, bytes, bytes]:
        what = "data request"
        obj = loads_object(self._opener.open(envelope.sealed_request, what), what)
        try:
            request_bytes = base64.b64decode(field(obj, "request", str, what), validate=True)
        except ValueError:
            raise malformed(f"{what} is not valid base64") from None
        signature = hex_bytes(obj.get("signature"), f"{what} signature", 64)
        envelope.querier_verify_key.verify(request_signing_bytes(request_bytes), signature, what)
        request = DataRequest.from_obj(loads_object(request_bytes, what))
        if request.query_id != envelope.query_id:
            raise malformed(f"{what} belongs to another query")
        if set(request.aggregators) != set(envelope.plan.leaves):
            raise malformed(f"{what} names aggregators other than the plan's leaves")
        return request, request_bytes, signature

    def collect(self, envelope: QueryEnvelope, sealed_pseudonyms: bytes) -> CollectReport:
        """Ask every target for its contribution, then forward them shuffled and batched to DAs."""
        verify_envelope(envelope, self._roster, self._settings)
        self._replays.check(envelope.query_id, "query")
        request, request_bytes, signature = self._open_request(envelope)
        what = "target pseudonyms"
        obj = loads_object(self._opener.open(sealed_pseudonyms, what), what)
        same_query(obj, envelope, what)
        pseudonyms = unpack(obj.get("pseudonyms"), 32, what)
        found = self._directory.lookup(pseudonyms)
        # A pseudonym TF knows but the directory does not (a batch whose settle never came)
        # is counted unreachable rather than failing everyone else's query.
        addresses = [a for a in found if a is not None]
        unknown = len(found) - len(addresses)
        self._replays.record(envelope.query_id)

        leaves = list(envelope.plan.leaves)
        self._random.shuffle(addresses)
        by_host: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for i, address in enumerate(addresses):
            host, instance = split_address(address)
            by_host[host].append((instance, leaves[i % len(leaves)]))

        size = self._settings.batch_size
        jobs = [
            (host, items[j : j + size]) for host, items in by_host.items() for j in range(0, len(items), size)
        ]
        per_da: dict[str, list[bytes]] = {leaf: [] for leaf in leaves}
        declined, unreachable = 0, unknown

        def ask(job: tuple[str, list[tuple[str, str]]]) -> tuple[int, list[tuple[str, bytes]], int]:
            host, items = job
            req = ContributionRequest(
                query_id=envelope.query_id,
                querier=envelope.querier,
                request=request_bytes,
                request_signature=signature,
                instance_ids=tuple(i for i, _ in items),
                aggregators=tuple(a for _, a in items),
            )
            try:
                batch = self._peers.personal_cloud(host).contribute(req)
            except DispersError as exc:
                log.warning("query %s: host %s failed: %s", envelope.query_id[:8], host, exc.code.value)
                return 0, [], len(items)
            pairs = [(a, ct) for a, ct in zip(batch.aggregators, batch.ciphertexts, strict=True)]
            return batch.declined, pairs, 0

        with ThreadPoolExecutor(max_workers=min(8, max(1, len(jobs)))) as pool:
            for n_declined, pairs, n_unreachable in pool.map(ask, jobs):
                declined += n_declined
                unreachable += n_unreachable
                for aggregator, ciphertext in pairs:
                    if aggregator not in per_da:
                        raise DispersError(ErrorCode.MALFORMED, "a host sealed to an aggregator not asked")
                    per_da[aggregator].append(ciphertext)

        def forward(leaf: str) -> None:
            items = per_da[leaf]
            self._random.shuffle(items)
            da = self._peers.data_aggregator(leaf)
            for j in range(0, len(items), size):
                da.ingest(envelope.query_id, items[j : j + size])

        with ThreadPoolExecutor(max_workers=len(leaves)) as pool:
            list(pool.map(forward, leaves))
        contributed = sum(len(v) for v in per_da.values())
        return CollectReport(
            targets=len(pseudonyms),
            contributed=contributed,
            declined=declined,
            unreachable=unreachable,
            per_aggregator=tuple((leaf, len(per_da[leaf])) for leaf in leaves),
        )
