"""Who takes part, when to stop waiting, and how peers find each other.

Three concerns live here, none of which touches tensors:

* **Participation** (pure): every peer derives the same update / aggregation / dropout sets from
  ``(seed, round)``, so no coordinator has to tell anybody who takes part.
* **Network runtime**: one libp2p daemon (``p2pd``) and one in-process Kademlia ``DHTNode`` per peer, driven
  by an asyncio loop on a background thread so that the training thread stays plain synchronous PyTorch. The
  daemon runs from an unpacked copy of hivemind's UPX-packed binary, so the daemons of a host share its code.
* **Addresses**: every node publishes where it listens (``{prefix}.addrs``, one subkey per peer id) and dials a
  peer at a published address before it opens a stream to it. libp2p's own peer routing cannot be relied on
  across hosts: its Kademlia tables drop addresses outside the public / private ranges it knows (e.g. the
  test ranges of RFC 5737, or any address when only a bootstrap node was dialled), so a peer that knows only
  the bootstrap node would never reach its group-mates on another host. The records every peer reads from every
  peer (addresses, data-plane endpoints) are also stored straight on the initial peers, which a new peer can
  dial before it knows anybody else.
* **Barriers**: one DHT key per barrier with one subkey per arrival; whoever reads it complete pushes the news
  to the root of the barrier's one tree of direct stores, every peer passes it on to its children, the others
  read rarely; the caller learns who arrived by the deadline.
* **DHT cost**: every poll is spaced by the number of peers, records stored or read again and again go straight
  to their key's nodes (:class:`Renewal`, :class:`RepeatedRead`), and nothing read is copied to other nodes.
* **Sitting a round out**: a peer that does not aggregate in a round waits until the round's aggregating peers
  have said they are done (one DHT key per round, one subkey per peer), so that it never runs ahead into groups
  whose other members are still busy with an earlier round.
"""
from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import json
import logging
import math
import os
import random
import signal
import struct
import threading
import time
from dataclasses import dataclass
from typing import (
    Any,
    Awaitable,
    Callable,
    Collection,
    Dict,
    FrozenSet,
    Iterable,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Set,
    Tuple,
    TypeVar,
)

import numpy as np

logger = logging.getLogger("mar_fl.sync")

T = TypeVar("T")

# Salts keep the random streams of the three participation decisions independent of each other.
_SALT_UPDATE, _SALT_AGGREGATE, _SALT_DROPOUT = 1, 2, 3


# hivemind's default (3 s) loses pings on an oversubscribed node (dozens of peers per core during start-up)
DHT_RPC_TIMEOUT = 10.0
DHT_READ_TIMEOUT = 2 * DHT_RPC_TIMEOUT  # a read is a search: a few rounds of RPCs


# a known peer is dialled again at its published addresses after this long (connections can be pruned)
REDIAL_AFTER = 60.0
# libp2p backs off from an address for ~5 s after a failed dial; a stream to a group-mate retries for this long
DIAL_PATIENCE, DIAL_RETRY_INTERVAL = 12.0, 1.0
# How many nodes a DHT search visits: hivemind's default (20 for a read, 40 or more for a store). Narrower
# searches cost less (8 / 16: a read 120 → 50 ms of CPU, a store 300 → 90 ms at 48 peers) but at 125 peers on two
# cores the nodes whose address book was still incomplete could no longer place their records where readers
# look: a third of the arrivals never showed. Fewer searches (pushed barriers, Renewal) is what stayed.
DHT_READ_BEAM: Optional[int] = None
DHT_STORE_BEAM: Optional[int] = None
BARRIER_POLL_PER_PEER = 0.1  # a barrier of N peers is read at most every max(0.1, 0.1 N) seconds per peer ...
BARRIER_LOCAL_CHECK = 0.2  # ... but its pushed completion is looked for in local storage this often
# The initial peers' copy of the arrivals (one subkey per peer, each checked by the reader) is read every 0.05 s per
# expected peer, 5x less often than their copy of the completion (empty until it lands): read as often as that, the
# 125 waiting peers of a start checked 12,500 subkeys a second between them.
BARRIER_ARRIVALS_READ_PER_PEER = 0.05
BARRIER_FANOUT = 4  # children per peer in the tree that passes a barrier's completion on
BARRIER_OVERRUN = 30.0  # a barrier call that outlasts its deadline by this much returns anyway (see barrier)
BARRIER_PUSH_RETRIES, BARRIER_PUSH_RETRY = 3, 5.0  # a completion push that failed is tried again this often
# A peer leaves a barrier once its pushes landed (or after this long): peers that went straight on to train took
# both cores while the rest were still learning of the completion (at 64 peers the last left the start barrier
# 8 s after the first).
BARRIER_PASS_ON = 2.0
CARD_ITEMS, CARD_TEXT = 4, 64  # a barrier card: at most this many ints and strings of at most this many chars
DHT_POLL_PER_PEER = 0.01  # see dht_poll_pause
RENEWAL_SEARCH_EVERY = 120.0  # a record renewed again and again looks for its key's nodes again this often
FEW_NODES_REFRESH = 5.0  # ... and this often while it knows fewer of them than the key should live on
BARRIER_NODES_REFRESH = 30.0  # ... a barrier's, whose peers' views of the DHT settle while it runs, this often
ADDRESS_RETRY = 3.0  # an address record that no node took is stored again after this (doubling each time)
ADDRESS_START_PATIENCE = 3.0  # a peer's start waits this long at most for its address record to be stored
ADDRESS_REFRESH_MIN_INTERVAL = 1.0  # re-read the address records at most this often when a peer is unknown
# a group-mate not yet in the address book (its record may still be on its way) is looked up again with
# backoff for this long before the exchange goes ahead without a dial
ADDRESS_LOOKUP_PATIENCE = DHT_RPC_TIMEOUT
MAX_ADDRS_PER_PEER = 8
MAX_MADDR_CHARS = 256
# set inside an address refresh: the DHT calls it makes must not wait for that same refresh (they did, until a
# timeout, whenever the refresh met a node not yet in the book: up to 9 s on a group's first step)
_IN_REFRESH: contextvars.ContextVar[bool] = contextvars.ContextVar("marfl_in_address_refresh", default=False)


class SyncError(RuntimeError):
    """The network runtime could not be started or a DHT operation failed for good."""


# ==================== participation (pure) ====================


def _round_rng(seed: int, round_index: int, salt: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, round_index, salt]))


def _sample(seed: int, round_index: int, salt: int, num_peers: int, percent: float) -> FrozenSet[int]:
    count = int(num_peers * percent / 100)
    if count >= num_peers:
        return frozenset(range(num_peers))
    chosen = _round_rng(seed, round_index, salt).choice(num_peers, size=count, replace=False)
    return frozenset(int(i) for i in chosen)


def update_participants(*, seed: int, round_index: int, num_peers: int, update_percent: float) -> FrozenSet[int]:
    """Peers that run local SGD in this round (``--up``)."""
    return _sample(seed, round_index, _SALT_UPDATE, num_peers, update_percent)


def last_trained_round(peer: int, round_index: int, *, seed: int, num_peers: int, update_percent: float,
                       horizon: int = 1000) -> Optional[int]:
    """The last round ``<= round_index`` in which ``peer`` ran local SGD (``--up``), looking back at most
    ``horizon`` rounds (None: not within them) — for gossip's staleness weights, known to every peer."""
    for r in range(round_index, max(0, round_index - horizon), -1):
        if peer in update_participants(seed=seed, round_index=r, num_peers=num_peers, update_percent=update_percent):
            return r
    return None


def aggregation_participants(
    *,
    seed: int,
    round_index: int,
    num_peers: int,
    update_percent: float,
    aggregate_percent: float,
    dropout_percent: float,
) -> FrozenSet[int]:
    """Peers that join Moshpit All-Reduce this round (``--ap``), minus simulated churn (``--dl``).

    As in the published reference, equal ``--up`` and ``--ap`` mean true partial participation: the same peers
    train and aggregate. Each remaining peer then drops out independently with probability ``--dl`` percent.
    """
    if aggregate_percent == update_percent:
        chosen = update_participants(
            seed=seed, round_index=round_index, num_peers=num_peers, update_percent=update_percent
        )
    else:
        chosen = _sample(seed, round_index, _SALT_AGGREGATE, num_peers, aggregate_percent)
    if dropout_percent <= 0:
        return chosen
    rng = _round_rng(seed, round_index, _SALT_DROPOUT)
    draws = rng.random(num_peers)  # one draw per peer index, so a peer's fate does not depend on the others
    return frozenset(i for i in chosen if draws[i] >= dropout_percent / 100)


# ==================== bootstrap addresses ====================


def write_bootstrap_file(path: str, maddrs: Sequence[str], *, attempt: Optional[str] = None) -> None:
    """Atomically publish the bootstrap node's multiaddrs (write then rename) for other hosts to read.

    ``attempt`` names this start of the job (Slurm job id + restart count), so that after a requeue the other
    nodes do not dial the addresses of the previous attempt that are still in the file.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"initial_peers": list(maddrs), "written_at": time.time(), "attempt": attempt}, f)
    os.replace(tmp, path)


def _bootstrap_addresses(path: str, attempt: Optional[str]) -> List[str]:
    """The multiaddrs in a bootstrap file; ValueError says why there are none (yet)."""
    with open(path) as f:
        data = json.load(f)  # json.JSONDecodeError is a ValueError
    if not isinstance(data, dict) or not isinstance(data.get("initial_peers"), list):
        raise ValueError("it has no list of initial_peers")
    if attempt is not None and data.get("attempt") != attempt:
        raise ValueError(f"it was written by attempt {data.get('attempt')}, not {attempt}")
    return [str(m) for m in data["initial_peers"]]


def read_bootstrap_file(path: str, *, timeout: float, attempt: Optional[str] = None) -> List[str]:
    """Wait up to ``timeout`` seconds for a bootstrap file written by node 0 (of ``attempt``, if given).

    Node 0 writes the file atomically, so an unreadable one is an older or foreign file: wait on, then say why.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _bootstrap_addresses(path, attempt)
        except FileNotFoundError:
            why = "it never appeared"
        except (OSError, ValueError) as e:
            why = str(e)
        if time.monotonic() >= deadline:
            raise SyncError(f"no usable bootstrap file at {path} after {timeout:g} s: {why} "
                            f"(is node 0 running with the same run dir?)")
        time.sleep(0.2)


MULTIADDR_PREFIXES = ("/ip4/", "/ip6/", "/dns")


def multiaddrs_in(value: str) -> Optional[List[str]]:
    """The multiaddrs of a comma/space separated ``--initial-peers`` value; None when it names a file instead."""
    if not value.startswith(MULTIADDR_PREFIXES):
        return None
    return [part for part in value.replace(",", " ").split() if part]


def check_multiaddr(maddr: str) -> None:
    """ValueError unless ``maddr`` parses (hivemind's Multiaddr) and names the peer to dial (``/p2p/<id>``)."""
    from hivemind.utils.multiaddr import Multiaddr

    try:
        protocols = {p.name for p in Multiaddr(maddr).protocols()}
    except ValueError as e:
        raise ValueError(f"{maddr!r} is not a valid multiaddr ({e})") from None
    if "p2p" not in protocols:
        raise ValueError(f"{maddr!r} has no /p2p/<peer id> part")


def parse_initial_peers(value: Optional[str], *, timeout: float = 120.0, attempt: Optional[str] = None) -> List[str]:
    """``--initial-peers``: comma/space separated multiaddrs, or the path of a bootstrap file."""
    if not value:
        return []
    maddrs = multiaddrs_in(value)
    return maddrs if maddrs is not None else read_bootstrap_file(value, timeout=timeout, attempt=attempt)


# ==================== addresses ====================


def advertised_maddrs(listening: Sequence[str], *, announce_host: Optional[str] = None) -> List[str]:
    """The multiaddrs other hosts should dial, from what the daemon listens on (``/ip4/A/tcp/P/p2p/ID``).

    ``announce_host`` replaces the address (NAT, a cluster's high-speed interface). Otherwise loopback
    addresses are dropped whenever the daemon also listens elsewhere: with ``--host 0.0.0.0`` the daemon lists
    every interface, and another host that dials 127.0.0.1 reaches itself.
    """
    from hivemind.utils.multiaddr import Multiaddr

    parsed = [Multiaddr(m) for m in listening]
    if announce_host:
        proto = "ip6" if ":" in announce_host else "ip4"
        ports = sorted({port for port in (_component(m, "tcp") for m in parsed) if port})
        ids = {pid for pid in (_component(m, "p2p") for m in parsed) if pid}
        return [f"/{proto}/{announce_host}/tcp/{port}/p2p/{pid}" for port in ports for pid in sorted(ids)]
    outside = [m for m in parsed if not _is_loopback(m)]
    return [str(m) for m in (outside or parsed)]


def _component(maddr, proto: str) -> Optional[str]:
    try:
        return maddr[proto]
    except Exception:  # noqa: BLE001 - the multiaddr has no such part
        return None


def _is_loopback(maddr) -> bool:
    import ipaddress

    address = _component(maddr, "ip4") or _component(maddr, "ip6")
    return address is not None and ipaddress.ip_address(address).is_loopback


def parse_address_record(subkey: Any, value: Any) -> Optional[Tuple[bytes, List[Any]]]:
    """``(peer id, dialable multiaddrs)`` from one address record, or None if it is malformed.

    Strict: the value is a short list of short strings, each a multiaddr that ends in ``/p2p/<subkey>``, so a
    record can only ever describe the peer id it is filed under.
    """
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    if not isinstance(subkey, str) or not isinstance(value, (list, tuple)) or not value:
        return None
    if len(value) > MAX_ADDRS_PER_PEER or not all(isinstance(v, str) and len(v) <= MAX_MADDR_CHARS for v in value):
        return None
    try:
        peer_id = PeerID.from_base58(subkey)
        suffix = Multiaddr(f"/p2p/{subkey}")
        maddrs = []
        for text in value:
            maddr = Multiaddr(text)
            if maddr["p2p"] != subkey:
                return None
            maddrs.append(maddr.decapsulate(suffix))
    except Exception:  # noqa: BLE001 - anything unparsable is simply not an address
        return None
    return peer_id.to_bytes(), maddrs


# --- The daemon binary -------------------------------------------------------------------------------------------
# hivemind ships ``p2pd`` packed by UPX (NRV2E): each daemon decompresses its 28.8 MB of code into private memory
# when it starts (≈ 25 MB and ≈ 0.3–0.5 CPU-s per daemon). Unpacked once into a per-user cache, the code is mapped
# from the page cache and shared by every daemon of the host.

DAEMON_ENV = "MARFL_P2PD"  # an explicit p2pd to run instead (e.g. one built by hand)
_ELF_MAGIC, _UPX_MAGIC = b"\x7fELF", b"UPX!"
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # ident, type, machine, version, entry, phoff, shoff, flags, sizes...
_PHDR = struct.Struct("<IIQQQQQQ")  # type, flags, offset, vaddr, paddr, filesz, memsz, align
_UPX_LINFO_PINFO = struct.Struct("<I4sHBBIII")  # checksum, magic, loader size, version, format | id, size, block
_UPX_BLOCK = struct.Struct("<IIBBBB")  # uncompressed size, compressed size, method, filter, filter arg, unused
_UPX_NRV2E_LE32, _PT_LOAD, _EM_X86_64 = 8, 1, 62


class PackedBinaryError(ValueError):
    """Not an executable this reader can unpack (any other packing, a filter, a damaged file)."""


def packed_daemon_path() -> str:
    import hivemind.hivemind_cli as cli

    return os.path.join(os.path.dirname(cli.__file__), "p2pd")


def _cache_base() -> str:
    return os.environ.get("MARFL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mar-fl")


def _daemon_cache_path(packed: str) -> str:
    st = os.stat(packed)
    # named p2pd like the original: process listings and leak checks look for that name
    return os.path.join(_cache_base(), f"p2pd-{st.st_size}-{st.st_mtime_ns}", "p2pd")


def _write_atomically(target: str, data: bytes, mode: int) -> None:
    os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
    tmp = f"{target}.{os.getpid()}-{os.urandom(4).hex()}.tmp"  # nodes sharing a home may share a pid too
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, target)  # atomic: launchers on several nodes may share the cache


# p2pd's built-in defaults switch the circuit relay service on, and no flag switches it off (``-relay=0`` only
# leaves the defaults alone). The service then loads an ASN table into a trie as the daemon starts: ≈ 0.5 CPU-s
# and ≈ 30 MB per daemon, 32 CPU-s for 64 peers starting at once on 2 cores. A config file replaces those
# defaults; the flags hivemind passes still set everything else. Peers never relay: every address is dialled.
DAEMON_CONFIG = b'{"Relay": {"Enabled": false}}\n'


def daemon_config_path() -> Optional[str]:
    """The config file every ``p2pd`` of this user reads (written once into the cache); None if it cannot be."""
    target = os.path.join(_cache_base(), "p2pd-config-norelay.json")
    try:
        with open(target, "rb") as f:
            if f.read() == DAEMON_CONFIG:
                return target
    except OSError:
        pass
    try:
        _write_atomically(target, DAEMON_CONFIG, 0o644)
    except OSError as e:
        logger.warning("p2pd keeps its relay service (≈ 30 MB more per peer): cannot write %s: %s", target, e)
        return None
    return target


def daemon_binary() -> str:
    """The ``p2pd`` a peer runs: ``$MARFL_P2PD``, else the unpacked copy if one was prepared, else hivemind's."""
    explicit = os.environ.get(DAEMON_ENV)
    if explicit:
        return explicit
    packed = packed_daemon_path()
    unpacked = _daemon_cache_path(packed)
    return unpacked if os.access(unpacked, os.X_OK) else packed


def prepare_daemon_binary() -> str:
    """Unpack hivemind's ``p2pd`` into the cache unless that was done already; returns what peers will run.

    Called once per launcher (never by peers: 64 of them would unpack at once). Falls back to the packed
    binary, with a warning, if it cannot be unpacked."""
    if os.environ.get(DAEMON_ENV):
        return os.environ[DAEMON_ENV]
    packed = packed_daemon_path()
    target = _daemon_cache_path(packed)
    if os.access(target, os.X_OK):
        return target
    logger.info("unpacking hivemind's p2pd into %s (once, a few seconds)", os.path.dirname(target))
    try:
        with open(packed, "rb") as f:
            unpacked = upx_unpack_elf(f.read())
        _write_atomically(target, unpacked, 0o755)
    except (OSError, PackedBinaryError) as e:
        logger.warning("running the packed p2pd (≈ 25 MB more per peer): cannot unpack it: %s", e)
        return packed
    return target


def upx_unpack_elf(packed: bytes) -> bytes:
    """The original of an x86-64 Linux ELF executable packed by UPX with NRV2E and no filter (hivemind's
    ``p2pd``), without section headers. Anything else raises ``PackedBinaryError``."""
    blocks = _upx_blocks(packed)
    header, body = blocks[0], b"".join(blocks[1:])
    loads = _elf_loads(header)
    out = bytearray(max(off + size for off, size in loads))
    out[: len(header)] = header
    pos = 0
    for off, size in loads:
        start = max(off, len(header))  # the first segment begins with the header, unpacked separately
        out[start: off + size] = body[pos: pos + off + size - start]
        pos += off + size - start
    if pos != len(body):
        raise PackedBinaryError(f"{len(body)} unpacked bytes for {pos} bytes of segments")
    out[40:48], out[60:64] = bytes(8), bytes(4)  # no section header table (it is not packed)
    return bytes(out)


def _upx_blocks(packed: bytes) -> List[bytes]:
    """The unpacked blocks that follow UPX's ``l_info`` / ``p_info`` (right after the packed program headers)."""
    if len(packed) < _EHDR.size or packed[:4] != _ELF_MAGIC:
        raise PackedBinaryError("not an ELF file")
    fields = _EHDR.unpack_from(packed)
    pos = fields[5] + fields[10] * _PHDR.size  # UPX's headers follow the program headers
    if len(packed) < pos + _UPX_LINFO_PINFO.size:
        raise PackedBinaryError("truncated")
    *_, magic, _, _, _, _, file_size, _ = _UPX_LINFO_PINFO.unpack_from(packed, pos)
    if magic != _UPX_MAGIC:
        raise PackedBinaryError("not packed by UPX")
    pos += _UPX_LINFO_PINFO.size
    blocks, total = [], 0
    while True:
        if len(packed) < pos + _UPX_BLOCK.size:
            raise PackedBinaryError("truncated")
        size, csize, method, ftid, _, _ = _UPX_BLOCK.unpack_from(packed, pos)
        pos += _UPX_BLOCK.size
        if size == 0:
            return blocks
        total += size
        if method != _UPX_NRV2E_LE32 or ftid or csize > size or total > file_size or pos + csize > len(packed):
            raise PackedBinaryError(f"unsupported block (method {method}, filter {ftid})")
        data = packed[pos: pos + csize]
        blocks.append(data if csize == size else _nrv2e_le32(data, size))
        pos += csize


def _elf_loads(header: bytes) -> List[Tuple[int, int]]:
    """``(offset, size)`` of each loadable segment of an x86-64 executable, in file order, from its headers."""
    if len(header) < _EHDR.size or header[:4] != _ELF_MAGIC or header[4:6] != b"\x02\x01":
        raise PackedBinaryError("the packed header is not a 64-bit little-endian ELF")
    fields = _EHDR.unpack_from(header)
    machine, phoff, phentsize, phnum = fields[2], fields[5], fields[9], fields[10]
    if machine != _EM_X86_64 or phentsize != _PHDR.size or len(header) != phoff + phnum * _PHDR.size:
        raise PackedBinaryError("unexpected ELF header")
    loads = sorted((p[2], p[5]) for p in (_PHDR.unpack_from(header, phoff + k * _PHDR.size) for k in range(phnum))
                   if p[0] == _PT_LOAD)
    if not loads or loads[0][0] != 0 or loads[0][1] < len(header):
        raise PackedBinaryError("the first loadable segment does not hold the header")
    if any(a + n > b for (a, n), (b, _) in zip(loads, loads[1:])):
        raise PackedBinaryError("overlapping segments")
    return loads


def _nrv2e_le32(src: bytes, size: int) -> bytes:
    """UCL's NRV2E decompression (32-bit little-endian bit buffer), checked to fill exactly ``size`` bytes."""
    out = bytearray()
    pos = bits = left = 0  # input position, bit buffer, bits left in it

    def bit() -> int:
        nonlocal pos, bits, left
        if not left:
            bits, pos, left = int.from_bytes(src[pos: pos + 4], "little"), pos + 4, 32
        left -= 1
        return (bits >> left) & 1

    def byte() -> int:
        nonlocal pos
        pos += 1
        return src[pos - 1]

    last_offset = 1
    try:
        while True:
            while bit():
                out.append(byte())
            offset = 2 + bit()
            while not bit():
                offset = (offset - 1) * 2 + bit()
                offset = offset * 2 + bit()
            if offset == 2:
                offset, length = last_offset, bit()
            else:
                offset = (offset - 3) * 256 + byte()
                if offset == 0xFFFFFFFF:
                    break
                length, offset = (offset & 1) ^ 1, (offset >> 1) + 1
                last_offset = offset
            length = _nrv2e_length(length, bit) + (offset > 0x500)
            _copy_match(out, offset, length + 1)
    except IndexError:
        raise PackedBinaryError("truncated compressed block") from None
    if len(out) != size or pos != len(src):
        raise PackedBinaryError(f"a block unpacked to {len(out)} bytes, {size} expected")
    return bytes(out)


def _nrv2e_length(short: int, bit: Callable[[], int]) -> int:
    if short:
        return 1 + bit()
    if bit():
        return 3 + bit()
    length = 1
    while True:
        length = length * 2 + bit()
        if bit():
            return length + 3


def _copy_match(out: bytearray, offset: int, length: int) -> None:
    start = len(out) - offset
    if start < 0:
        raise PackedBinaryError("a match points before the start")
    if offset >= length:
        out += out[start: start + length]
    else:  # overlapping: repeats the last ``offset`` bytes
        for k in range(length):
            out.append(out[start + k])


class RoutedP2P:
    """Mixin for hivemind's ``P2P``: dial a peer at its published addresses before talking to it.

    Both ways hivemind talks to a peer (unary calls and streams) pass through here, so the DHT and the
    averaging reach peers on other hosts alike. ``lookup(peer_id_bytes)`` returns the addresses (or an empty
    list); it may refresh the address records first.
    """

    lookup: Any = None
    # p2pd's own Kademlia DHT (go-libp2p-kad-dht) is not needed: peers are found through hivemind's DHT and the
    # run's address records. Off, a daemon starts ≈ 4× faster and makes no background DHT traffic.
    DHT_MODE_MAPPING = {"off": {}, "auto": {"dht": 1}, "server": {"dhtServer": 1}, "client": {"dhtClient": 1}}

    @staticmethod
    def _log_p2pd_message(line: str) -> None:
        from hivemind.p2p import P2P

        # hivemind logs the daemon's plain output at DEBUG: a Go crash would leave no trace in the peer's log
        if line.startswith(("panic:", "fatal error:")):
            logger.warning("p2pd: %s", line)
        P2P._log_p2pd_message(line)

    def _make_process_args(self, binary: str, *args, **kwargs) -> List[str]:
        config = daemon_config_path()
        if config:
            kwargs["f"] = config
        return super()._make_process_args(daemon_binary(), *args, **kwargs)  # type: ignore[misc]

    def _routing_state(self) -> Dict[bytes, float]:
        if not hasattr(self, "_dialled"):
            self._dialled: Dict[bytes, float] = {}
        return self._dialled

    async def _ensure_route(self, peer_id) -> None:
        """Dial ``peer_id`` at its published addresses (once per ``REDIAL_AFTER``)."""
        dialled, key = self._routing_state(), peer_id.to_bytes()
        last = dialled.get(key)
        if self.lookup is None or key == self.peer_id.to_bytes() or (last and time.monotonic() - last < REDIAL_AFTER):
            return
        maddrs = await self.lookup(key)
        if not maddrs:
            return
        try:
            await asyncio.wait_for(self._client.connect(peer_id, maddrs), DHT_RPC_TIMEOUT)
            dialled[key] = time.monotonic()
        except Exception as e:  # noqa: BLE001 - the call itself will fail and say why
            logger.debug("could not dial %s at %s: %r", peer_id, maddrs, e)

    def _forget_route(self, peer_id) -> None:
        self._routing_state().pop(peer_id.to_bytes(), None)

    async def _routed(self, call, peer_id, *args, patience: float = 0.0, **kwargs):
        """``call`` after a dial; with ``patience``, a call refused for a dial backoff (it sent nothing) is dialled
        and tried again until the backoff passes: two group-mates that dial each other at once can both fail the
        handshake, and libp2p then refuses to dial either address for a few seconds."""
        deadline = time.monotonic() + patience
        while True:
            await self._ensure_route(peer_id)
            try:
                return await call(peer_id, *args, **kwargs)
            except Exception as e:
                self._forget_route(peer_id)  # dial again next time: the peer may have moved or restarted
                if "dial backoff" not in str(e) or time.monotonic() + DIAL_RETRY_INTERVAL > deadline:
                    raise
                logger.debug("stream to %s refused for a dial backoff; trying again", peer_id)
            await asyncio.sleep(DIAL_RETRY_INTERVAL)

    async def _call_unary_protobuf_handler(self, peer_id, *args, **kwargs):
        return await self._routed(super()._call_unary_protobuf_handler, peer_id, *args, **kwargs)

    async def call_binary_stream_handler(self, peer_id, *args, **kwargs):
        # streams carry tensors to group-mates: worth waiting out a dial backoff (DHT calls never wait for it)
        return await self._routed(super().call_binary_stream_handler, peer_id, *args, patience=DIAL_PATIENCE,
                                  **kwargs)


# ==================== closed runs ====================


def _record_validator_base():
    from hivemind.dht.validation import RecordValidatorBase

    return RecordValidatorBase


class RunSecretValidator(_record_validator_base()):
    """Only holders of the run's secret can write DHT records that other members accept.

    Each stored value carries an HMAC-SHA256 over (key, subkey, value, expiration) under the per-run secret; a
    record without a valid tag is refused when a stranger asks a member to store it and ignored when a member
    reads it. Records stay readable by anyone who can reach a node: authenticity, not confidentiality.
    """

    TAG = b"[marfl-hmac:"
    SUFFIX = len(TAG) + 32 + 1

    def __init__(self, secret: bytes):
        if len(secret) < 16:
            raise ValueError("the run secret must be at least 16 bytes")
        self._secret = bytes(secret)

    def _mac(self, record, value: bytes) -> bytes:
        fields = (record.key, record.subkey, value, struct.pack(">d", record.expiration_time))
        message = b"".join(len(f).to_bytes(4, "big") + f for f in fields)
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def sign_value(self, record) -> bytes:
        return record.value + self.TAG + self._mac(record, record.value) + b"]"

    def validate(self, record) -> bool:
        value = record.value
        if len(value) < self.SUFFIX or not value.endswith(b"]") or value[-self.SUFFIX:-33] != self.TAG:
            return False
        return hmac.compare_digest(value[-33:-1], self._mac(record, value[: -self.SUFFIX]))

    def strip_value(self, record) -> bytes:
        return record.value[: -self.SUFFIX]

    @property
    def priority(self) -> int:
        return 10  # outermost: checked before anything looks inside the value


def load_run_secret(run_dir: str, *, create: bool, timeout: float = 0.0) -> bytes:
    """The run's shared secret: ``MARFL_RUN_SECRET`` (hex) if set, else ``RUN_DIR/run_secret`` (mode 0600).

    The primary launcher creates the file; the others (same user, shared file system) wait up to ``timeout``
    seconds for it. Without the secret nobody can write records that the run's peers accept.
    """
    env = os.environ.get("MARFL_RUN_SECRET")
    if env:
        try:
            secret = bytes.fromhex(env)
        except ValueError:
            raise SyncError("MARFL_RUN_SECRET must be hex") from None
        if len(secret) < 16:
            raise SyncError("MARFL_RUN_SECRET must hold at least 16 bytes (32 hex digits)")
        return secret
    path = os.path.join(run_dir, "run_secret")
    if create:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(os.urandom(32).hex())
        except FileExistsError:
            pass  # a resumed run keeps its secret
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path) as f:
                return bytes.fromhex(f.read().strip())
        except (FileNotFoundError, ValueError):
            if time.monotonic() >= deadline:
                raise SyncError(f"no run secret at {path} (the first launcher writes it; or set MARFL_RUN_SECRET)")
            time.sleep(0.2)


# ==================== network runtime ====================


@dataclass(frozen=True)
class NetworkOptions:
    initial_peers: Sequence[str] = ()
    host: str = "127.0.0.1"
    port: int = 0
    announce_host: Optional[str] = None
    nat_port_map: bool = False  # p2pd's UPnP/NAT-PMP probing of the local router is opt-in (WAN runs only)
    startup_timeout: float = 60.0
    prefix: str = "marfl"  # run scope of the address records
    run_secret: Optional[bytes] = None  # records must carry this run's HMAC (None: an open DHT, tests only)
    address_ttl: float = 600.0


def quiet_abandoned_waits(loop: asyncio.AbstractEventLoop, context: Dict[str, Any]) -> None:
    """The network loop's exception handler: an ``Event.wait()`` task collected while pending and the failure of an
    RPC whose caller had given up are logged at DEBUG, anything else as asyncio would. hivemind's DHT search starts
    one such task per request and leaves it pending when the search is cancelled (every DHT read of ours has a
    deadline); each was an ERROR line in the peer logs (25 of 125 peers logged 2-24 of them in a 3-round run),
    though nothing had failed."""
    task = context.get("task") or context.get("future")
    coro = getattr(task.get_coro() if isinstance(task, asyncio.Task) else None, "__qualname__", "")
    message = str(context.get("message", ""))
    if message.startswith("Task was destroyed but it is pending") and coro == "Event.wait":
        logger.debug("an abandoned DHT search left a wait pending: %r", task)
        return
    if message.startswith("Task exception was never retrieved") and coro == "P2P.call_protobuf_handler":
        # hivemind's stubs run each RPC in a wait_for: a call that failed (a dial timed out on a loaded host) just
        # as its caller's deadline cancelled it keeps an exception that nobody is left to read
        logger.debug("an RPC whose caller had given up failed: %r", context.get("exception"))
        return
    loop.default_exception_handler(context)


class PendingCalls(dict):
    """hivemind's table of the RPCs that wait for their reply from ``p2pd`` (``ControlClient._pending_calls``),
    where a call whose caller gave up is no longer pending.

    hivemind's one reader of the daemon connection sets each reply on the future listed for its call. When a
    reply came in the same loop pass in which the caller's deadline cancelled that future, setting it raised
    ``InvalidStateError`` and ended the reader: from then on no RPC of the peer got a reply and no request
    reached its handlers, without a word in the log. In 4 of 9 64-peer runs, one peer lost its DHT so at the
    start and waited out every DHT read and barrier after it. Here a cancelled or finished call is not "in" the
    table, so such a reply is dropped as one for an unknown call.
    """

    def __contains__(self, call_id: object) -> bool:
        future = self.get(call_id)
        return future is not None and not future.done()


def guard_late_replies(p2p: Any) -> None:
    """Make ``p2p``'s daemon connection survive replies to calls that timed out (:class:`PendingCalls`)."""
    control = _daemon_control(p2p)
    control._pending_calls = PendingCalls(control._pending_calls)


def _daemon_control(p2p: Any) -> Any:
    """hivemind's client of ``p2p``'s daemon connection (``ControlClient``), or None."""
    return getattr(getattr(p2p, "_client", None), "control", None)


class PeerNetwork:
    """One ``p2pd`` plus one in-process hivemind ``DHTNode``, served by an asyncio loop on a daemon thread.

    The DHT node runs in this process rather than in ``hivemind.DHT``'s forked helper: that saves a process per
    peer (memory is what limits how many peers fit on a node) and lets the averager share the same daemon.
    """

    def __init__(self, options: NetworkOptions):
        self.options = options
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(quiet_abandoned_waits)
        self._thread = threading.Thread(target=self._run_loop, name="mar-fl-net", daemon=True)
        self.p2p: Any = None
        self.dht: Any = None
        self._closed = False
        self.addresses: Dict[bytes, List[Any]] = {}  # peer id -> dialable multiaddrs, from the address records
        self._last_refresh = -math.inf
        self._refreshing: Optional[asyncio.Future] = None
        self._refresh_pause = ADDRESS_REFRESH_MIN_INTERVAL
        self._publisher: Optional[asyncio.Task] = None
        self.start_stages: Dict[str, float] = {}  # seconds each step of the start took (daemon, dht, ...)

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self) -> "PeerNetwork":
        self._thread.start()
        try:
            self.run(self._create(), timeout=self.options.startup_timeout + 30)
        except Exception as e:
            self.shutdown()
            raise SyncError(f"could not start the peer-to-peer network: {e}") from e
        return self

    async def _create(self) -> None:
        from hivemind.dht.node import DHTNode
        from hivemind.p2p import P2P

        opts = self.options
        proto = "ip6" if ":" in opts.host else "ip4"
        port = opts.port or (_free_port(opts.host) if opts.announce_host else 0)
        announce = [f"/{'ip6' if ':' in opts.announce_host else 'ip4'}/{opts.announce_host}/tcp/{port}"] \
            if opts.announce_host else None
        stage = time.monotonic()

        def done(name: str) -> None:
            nonlocal stage
            now = time.monotonic()
            self.start_stages[name], stage = now - stage, now

        self.p2p = await _start_daemon(
            type("MarFlP2P", (RoutedP2P, P2P), {}), time.monotonic() + opts.startup_timeout,
            initial_peers=list(opts.initial_peers),
            host_maddrs=[f"/{proto}/{opts.host}/tcp/{port}"],
            announce_maddrs=announce,
            nat_port_map=opts.nat_port_map,
            use_relay=False,
            auto_nat=False,
            dht_mode="off",
            tls=os.environ.get("MARFL_TLS", "1") == "1",
        )
        done("daemon")
        self.dht = await DHTNode.create(
            p2p=self.p2p,
            initial_peers=list(opts.initial_peers),
            cache_locally=False,  # barriers must see fresh subkeys, never a cached snapshot
            cache_on_store=False,
            # nor copy what they read to other nodes: by default every read that finds a record sends all of it
            # (every subkey, each checked there) to one more node, the busiest ones at 125 peers
            cache_nearest=0,
            wait_timeout=DHT_RPC_TIMEOUT,
            ensure_bootstrap_success=False,  # checked below, with retries instead of one 3-second chance
            record_validator=RunSecretValidator(opts.run_secret) if opts.run_secret else None,
        )
        done("dht")
        self.p2p.lookup = self._lookup_address
        await self._ensure_bootstrapped(time.monotonic() + opts.startup_timeout)
        done("bootstrap")
        # the start waits for the first copies of our address record a short while only: a node slow to take its
        # DHT copy held a peer for a whole RPC timeout (10 s of a 64-peer start). The copies on the initial peers,
        # where every peer reads first, must have landed though (else nobody can dial us); the rest goes on
        first = asyncio.ensure_future(self._publish_address())
        await asyncio.wait({first}, timeout=ADDRESS_START_PATIENCE)
        if not first.done():
            await self._store_address_on_initial_peers()
        self._publisher = asyncio.create_task(self._publish_address_after(first))
        done("address")

    # ---------- address records ----------

    def address_key(self) -> str:
        return f"{self.options.prefix}.addrs"

    async def advertised(self) -> List[str]:
        listening = [str(m) for m in await self.p2p.get_visible_maddrs(latest=True)]
        return advertised_maddrs(listening, announce_host=self.options.announce_host)

    def initial_peer_ids(self) -> List[Any]:
        """The peer ids of the initial peers (not our own): the nodes every peer can dial from the start."""
        from hivemind.p2p import PeerID
        from hivemind.utils.multiaddr import Multiaddr

        ids = {PeerID.from_base58(Multiaddr(m)["p2p"]) for m in self.options.initial_peers}
        return sorted(ids - {self.p2p.peer_id}, key=lambda p: p.to_bytes()) if ids else []

    async def store_shared(self, key: str, subkey: str, value: Any, *, ttl: float,
                           renewal: Optional["Renewal"] = None) -> bool:
        """Store a record that every peer reads (addresses, data-plane endpoints) in the DHT (through ``renewal``
        when the record is renewed again and again) and straight on the initial peers; True if every copy landed.
        The direct copy is what a peer that has just joined can read: a DHT search must reach nodes it can dial
        only once it knows their addresses (at 125 peers a third of the peers stored their records on the
        bootstrap node and themselves only, where no reader looked)."""
        in_dht = renewal.store(subkey, value, ttl=ttl) if renewal is not None \
            else publish(self.dht, key, subkey, value, ttl=ttl)
        direct = [store_at(self.dht, p, key, subkey, value, ttl=ttl) for p in self.initial_peer_ids()]
        stored = await asyncio.gather(in_dht, *direct, return_exceptions=True)
        return all(ok is True for ok in stored)

    async def read_shared(self, key: str, *, timeout: float = DHT_READ_TIMEOUT) -> Dict[str, Any]:
        """The subkeys of a record stored with :meth:`store_shared`: what this node holds, what the initial peers
        hold and what a DHT search finds, merged (a copy that could not be read is left out)."""
        reads = [read_subkeys(self.dht, key, timeout=timeout)] + [
            asyncio.wait_for(read_at(self.dht, p, key), min(timeout, DHT_READ_TIMEOUT))
            for p in self.initial_peer_ids()]
        merged = read_local(self.dht, key) if self.dht is not None else {}
        for record in await asyncio.gather(*reads, return_exceptions=True):
            if isinstance(record, BaseException):
                logger.debug("a copy of %s unread: %r", key, record)
            else:
                merged.update(record)
        return merged

    async def _publish_address(self) -> bool:
        try:
            return await self.store_shared(self.address_key(), self.p2p.peer_id.to_base58(),
                                           await self.advertised(), ttl=self.options.address_ttl)
        except Exception as e:  # noqa: BLE001 - retried soon; peers may still reach us via the bootstrap
            logger.debug("address record not published: %r", e)
            return False

    async def _store_address_on_initial_peers(self) -> None:
        subkey, value = self.p2p.peer_id.to_base58(), await self.advertised()
        stored = await asyncio.gather(*(
            asyncio.wait_for(store_at(self.dht, p, self.address_key(), subkey, value, ttl=self.options.address_ttl),
                             DHT_RPC_TIMEOUT) for p in self.initial_peer_ids()), return_exceptions=True)
        if stored and not any(ok is True for ok in stored):
            logger.warning("our address record is on no initial peer yet: peers may not reach us for a while")

    async def _publish_address_after(self, first: Awaitable[bool]) -> None:
        await self._publish_address_forever(await first)

    async def _publish_address_forever(self, stored: bool = True) -> None:
        """Keep our address record fresh for as long as we run (it expires if we die). A record that no node
        took is stored again within seconds (with backoff), not at the next renewal: until it lands, no peer that
        we have not called ourselves can dial us (at 125 peers a third of the records were missing)."""
        retry = ADDRESS_RETRY
        while True:
            await asyncio.sleep(self.options.address_ttl / 3 if stored else retry)
            retry = ADDRESS_RETRY if stored else min(2 * retry, self.options.address_ttl / 3)
            stored = await self._publish_address()

    async def refresh_addresses(self) -> int:
        """Read every node's address record; returns how many peers we can dial.

        Single-flight: callers that come while a read is in progress share it. Every DHT call to a peer not yet
        in the book asks for a refresh; without sharing, a busy start-up turned into thousands of concurrent
        full-DHT reads per peer, each making more DHT calls (64 peers took 200 s to start, some never did).
        """
        self._last_refresh = time.monotonic()
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._read_addresses())
        return await asyncio.shield(self._refreshing)

    async def _read_addresses(self) -> int:
        started = time.monotonic()
        _IN_REFRESH.set(True)  # this task's context only (and the tasks it starts)
        try:
            # shared by every caller and awaited by none for long: given time to finish on a loaded host (the
            # bound of other reads cut it short and left group-mates undialable in a loaded test run)
            for subkey, value in (await self.read_shared(self.address_key(), timeout=3 * DHT_READ_TIMEOUT)).items():
                parsed = parse_address_record(subkey, value)
                if parsed is not None:
                    self.addresses[parsed[0]] = parsed[1]
        finally:  # a slow read (a busy node) spaces the next lookup-driven read out as much
            self._refresh_pause = max(ADDRESS_REFRESH_MIN_INTERVAL, time.monotonic() - started)
            self._last_refresh = time.monotonic()
        return len(self.addresses)

    async def await_addresses(self, peer_ids: Iterable[bytes], *, patience: float = ADDRESS_LOOKUP_PATIENCE) -> bool:
        """Refresh the address book with backoff until it holds every one of ``peer_ids`` or ``patience`` runs out.

        Routing itself never waits (the DHT talks to peers before they publish); callers that are about to
        exchange tensors with group-mates met for the first time wait here, so the first dial is not skipped.
        Returns whether every peer is known.
        """
        missing = set(peer_ids) - {self.p2p.peer_id.to_bytes()}
        deadline, delay = time.monotonic() + patience, 0.25
        while not missing <= self.addresses.keys():
            try:
                await asyncio.wait_for(self.refresh_addresses(), max(0.1, deadline - time.monotonic()))
            except Exception as e:  # noqa: BLE001 - retried until the deadline
                logger.debug("address refresh failed: %r", e)
            if missing <= self.addresses.keys() or time.monotonic() + delay >= deadline:
                break
            await asyncio.sleep(delay)
            delay = min(2 * delay, 2.0)
        return missing <= self.addresses.keys()

    async def is_member(self, peer_id) -> bool:
        """Whether ``peer_id`` published an address record of this run (authenticated when the run is closed)."""
        return await self.await_addresses([peer_id.to_bytes()])

    async def _lookup_address(self, peer_id: bytes) -> List[Any]:
        if _IN_REFRESH.get():  # a call made by the refresh itself: what we know now, or libp2p's own peerstore
            return self.addresses.get(peer_id, [])
        if peer_id not in self.addresses and time.monotonic() - self._last_refresh >= self._refresh_pause:
            self._last_refresh = time.monotonic()  # now, not when the refresh task first runs: calls race here
            try:
                await asyncio.wait_for(self.refresh_addresses(), DHT_RPC_TIMEOUT)
            except Exception as e:  # noqa: BLE001 - the dial falls back to libp2p's own routing
                logger.debug("address refresh failed: %r", e)
        return self.addresses.get(peer_id, [])

    async def _ensure_bootstrapped(self, deadline: float) -> None:
        """Ping the initial peers until one answers: on a busy node the first ping may simply be late."""
        from hivemind.p2p import PeerID
        from hivemind.utils.multiaddr import Multiaddr

        peers = {PeerID.from_base58(Multiaddr(m)["p2p"]) for m in self.options.initial_peers}
        while peers and not self.dht.protocol.routing_table.uid_to_peer_id:
            answers = await asyncio.gather(*(self.dht.protocol.call_ping(p) for p in peers), return_exceptions=True)
            if any(a is not None and not isinstance(a, BaseException) for a in answers):
                await self._look_up_neighbours(deadline)
                return
            if time.monotonic() >= deadline:
                raise SyncError("none of the initial peers answered a DHT ping")
            logger.warning("no initial peer answered a DHT ping yet; retrying")
            await asyncio.sleep(1.0)

    async def _look_up_neighbours(self, deadline: float) -> None:
        """Fill the routing table with the nodes nearest to us. Only an optimisation: the DHT also learns them as
        it is used, so a slow lookup (125 peers starting on 2 cores; 28 of them died of it) is not fatal."""
        try:
            await asyncio.wait_for(self.dht.find_nearest_nodes([self.dht.node_id]),
                                   max(1.0, min(3 * DHT_RPC_TIMEOUT, deadline - time.monotonic())))
        except asyncio.TimeoutError:
            logger.warning("the first lookup of our DHT neighbours timed out; going on with the bootstrap peers")

    @property
    def p2pd_pid(self) -> Optional[int]:
        child = getattr(self.p2p, "_child", None)
        return None if child is None else child.pid

    def run(self, coro: Awaitable[T], *, timeout: Optional[float] = None) -> T:
        """Run a coroutine on the network loop from the (synchronous) caller's thread."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def visible_maddrs(self) -> List[str]:
        """Where other hosts reach this node (what goes into ``bootstrap.json`` and the address records)."""
        return self.run(self.advertised(), timeout=30)

    def daemon_alive(self) -> bool:
        """False once our ``p2pd`` has exited, or our one connection to it (every RPC's reply and every request
        to our handlers comes through it) has ended: nothing can be sent or received any more."""
        child = getattr(self.p2p, "_child", None)
        if child is None or child.returncode is not None:
            return False
        reader = getattr(_daemon_control(self.p2p), "_read_task", None)
        return reader is None or not reader.done()

    def shutdown(self) -> None:
        """Stop the DHT node and the daemon; safe to call twice and from any exit path."""
        if self._closed:
            return
        self._closed = True
        if self.loop.is_running():
            try:
                self.run(self._close(), timeout=10)
            except BaseException as e:  # noqa: BLE001 - shutdown must go on whatever failed
                logger.debug("network shutdown: %r", e)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        self.kill_daemon()

    async def _close(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
        if self.dht is not None:
            await asyncio.wait_for(self.dht.shutdown(), timeout=5)
        if self.p2p is not None:
            await asyncio.wait_for(self.p2p.shutdown(), timeout=5)
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def kill_daemon(self) -> None:
        """Last resort for signal handlers and atexit: the daemon must never outlive its peer."""
        pid = self.p2pd_pid
        if pid is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            for _ in range(20):
                try:
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        return
                except ChildProcessError:
                    return
                time.sleep(0.05)


async def _start_daemon(p2p_cls, deadline: float, **kwargs):
    """``p2p_cls.create(**kwargs)``, started again while p2pd exits for want of its bootstrap peers: it gives them
    a few seconds only, and the bootstrap node is at its busiest while a whole host of peers starts (6 of 125
    peers died of it). Any other failure, or the deadline, ends the start."""
    from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError

    attempt = 1
    while True:
        try:
            p2p = await p2p_cls.create(startup_timeout=max(1.0, deadline - time.monotonic()), **kwargs)
            guard_late_replies(p2p)
            return p2p
        except P2PDaemonError as e:
            pause = random.uniform(0.5, 1.5) * min(attempt, 4)
            if "failed to connect to bootstrap peers" not in str(e) or time.monotonic() + pause + 1 > deadline:
                raise
            logger.info("p2pd could not reach its bootstrap peers (attempt %d); starting it again", attempt)
            attempt += 1
            await asyncio.sleep(pause)


def _free_port(host: str) -> int:
    """A TCP port free on ``host`` now (p2pd must be told its port when it announces another address)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ==================== DHT barriers ====================


def dht_time() -> float:
    from hivemind.utils import get_dht_time

    return get_dht_time()


async def publish(dht: Any, key: str, subkey: str, value: Any, *, ttl: float) -> bool:
    return await dht.store(key, value, expiration_time=dht_time() + ttl, subkey=subkey, beam_size=DHT_STORE_BEAM)


async def read_subkeys(dht: Any, key: str, *, timeout: float = DHT_READ_TIMEOUT) -> Dict[str, Any]:
    """All subkeys of ``key`` with their values: one DHT ``get`` whatever the number of peers; raises
    ``asyncio.TimeoutError`` past ``timeout`` (on an overloaded DHT one search was seen to hang for minutes)."""
    found = await asyncio.wait_for(dht.get(key, latest=True, beam_size=DHT_READ_BEAM), timeout)
    if found is None or not isinstance(found.value, dict):
        return {}
    return {str(sub): item.value for sub, item in found.value.items()}


async def poll_read(dht: Any, key: str, *, timeout: float = DHT_READ_TIMEOUT) -> Dict[str, Any]:
    """:func:`read_subkeys` for a poll that reads again later: a read that timed out saw nothing (yet)."""
    try:
        return await read_subkeys(dht, key, timeout=max(0.1, timeout))
    except asyncio.TimeoutError:
        logger.debug("read of %s timed out", key)
        return {}


def _signed(dht: Any, key_id: Any, subkey: str, value: Any, expiration: float) -> bytes:
    """``value`` serialized as a DHT record of ``key_id`` / ``subkey``, with the run's HMAC when there is one."""
    from hivemind.dht.validation import DHTRecord

    proto = dht.protocol
    value_bytes = proto.serializer.dumps(value)
    if proto.record_validator is not None:
        record = DHTRecord(key_id.to_bytes(), proto.serializer.dumps(subkey), value_bytes, expiration)
        value_bytes = proto.record_validator.sign_value(record)
    return value_bytes


async def store_at(dht: Any, peer_id: Any, key: str, subkey: str, value: Any, *, ttl: float) -> bool:
    """Store one subkey of ``key`` on the node ``peer_id`` only (one RPC, no search): how a barrier's completion
    is pushed. The record is signed like any other, so the receiving node checks it the same way."""
    from hivemind.dht.routing import DHTID

    key_id, expiration = DHTID.generate(source=key), dht_time() + ttl
    value_bytes = _signed(dht, key_id, subkey, value, expiration)
    stored = await dht.protocol.call_store(peer_id, keys=[key_id], values=[value_bytes],
                                           expiration_time=[expiration], subkeys=[subkey])
    return bool(stored and stored[0])


class KeyNodes:
    """The nodes that hold ``key`` (its nearest nodes; this node's own id may be among them): found by one search
    and reused until :meth:`forget` or until ``refresh`` seconds pass (nodes that joined since may be nearer by
    then; :data:`FEW_NODES_REFRESH` seconds when the search found fewer nodes than the key should live on).

    :param dht: this peer's ``DHTNode``
    :param key: the record's key
    :param refresh: seconds after which the key's nodes are looked up again
    """

    def __init__(self, dht: Any, key: str, *, refresh: float = RENEWAL_SEARCH_EVERY):
        from hivemind.dht.routing import DHTID

        self.dht, self.key, self.key_id, self.refresh = dht, key, DHTID.generate(source=key), refresh
        self._nodes: Dict[Any, Any] = {}  # DHTID -> PeerID
        self._found_at = -math.inf
        self._search: Optional[asyncio.Future] = None  # a search under way, which concurrent callers share

    async def get(self) -> Dict[Any, Any]:
        """``{node id: peer id}`` of the key's nodes (one search when none are known or they are old)."""
        # fewer nodes than the key lives on: a young routing table (or a small run) may know more soon
        fresh = self.refresh if len(self._nodes) >= self.dht.num_replicas else min(self.refresh, FEW_NODES_REFRESH)
        if self._nodes and time.monotonic() - self._found_at <= fresh:
            return self._nodes
        if self._search is None or self._search.done():
            self._search = asyncio.ensure_future(self._find())
        return await asyncio.shield(self._search)

    async def _find(self) -> Dict[Any, Any]:
        found = await self.dht.find_nearest_nodes([self.key_id], k_nearest=self.dht.num_replicas,
                                                  beam_size=DHT_STORE_BEAM)
        self._nodes, self._found_at = dict(found.get(self.key_id, {})), time.monotonic()
        return self._nodes

    def forget(self) -> None:
        """Search again next time (a node did not answer)."""
        self._nodes = {}


class Renewal:
    """A record that this peer stores again and again (its heartbeat, its data-plane endpoint): the nodes that
    hold ``key`` are found by one search (:class:`KeyNodes`) and then stored to directly, one RPC each, until a
    node does not answer. A heartbeat at 64 peers thus costs 5 RPCs instead of a search (≈ 40 RPCs) plus 5 stores.

    :param dht: this peer's ``DHTNode``
    :param key: the record's key; :meth:`store` takes the subkey
    :param nodes: the key's nodes, shared with this peer's reads of the key (default: looked up on their own)
    """

    def __init__(self, dht: Any, key: str, *, nodes: Optional[KeyNodes] = None):
        self.dht, self.nodes = dht, nodes or KeyNodes(dht, key)

    async def store(self, subkey: str, value: Any, *, ttl: float) -> bool:
        """Store ``subkey``: ``value``; True when at least one of the key's nodes took it."""
        key_id, expiration = self.nodes.key_id, dht_time() + ttl
        nodes = await self.nodes.get()
        value_bytes = _signed(self.dht, key_id, subkey, value, expiration)

        async def one(node_id, peer_id) -> Optional[bool]:  # None: no answer
            if node_id == self.dht.node_id:
                return self.dht.protocol.storage.store_subkey(key_id, subkey, value_bytes, expiration)
            stored = await self.dht.protocol.call_store(peer_id, keys=[key_id], values=[value_bytes],
                                                        expiration_time=[expiration], subkeys=[subkey])
            return None if not stored else bool(stored[0])

        outcomes = await asyncio.gather(*(one(n, p) for n, p in nodes.items()), return_exceptions=True)
        if any(outcome is None or isinstance(outcome, BaseException) for outcome in outcomes):
            self.nodes.forget()  # a node is gone or too busy to answer (one that refused, holding a newer copy, is not)
        return any(outcome is True for outcome in outcomes)


class RepeatedRead:
    """A record that this peer reads again and again (the launcher's control record every round, a round's done
    record while sitting the round out, the heartbeats), read straight from its key's nodes (:class:`KeyNodes`):
    one RPC each instead of a search each time. At 64 peers a search (``get``) took ≈ 20 ``find`` RPCs; the control
    record alone, read once a round by every peer, made four fifths of the DHT's calls during a round.

    A subkey that several nodes hold is taken from the newest copy. A read that fewer than half of the nodes
    answered is a full search instead (:func:`read_subkeys`), and the nodes are looked up again next time (else
    when their ``refresh`` time has passed).

    :param dht: this peer's ``DHTNode``
    :param key: the record's key
    :param nodes: the key's nodes, shared with this peer's stores of the key (default: looked up on their own)
    """

    def __init__(self, dht: Any, key: str, *, nodes: Optional[KeyNodes] = None):
        self.dht, self.nodes = dht, nodes or KeyNodes(dht, key)

    async def read(self, *, timeout: float = DHT_READ_TIMEOUT) -> Dict[str, Any]:
        """All subkeys of the key with their values; raises ``asyncio.TimeoutError`` past ``timeout``."""
        deadline = time.monotonic() + timeout
        nodes = await asyncio.wait_for(self.nodes.get(), timeout)
        copies = await asyncio.gather(*(self._read_one(node_id, peer_id, deadline)
                                        for node_id, peer_id in nodes.items()))
        answered = [copy for copy in copies if copy is not None]
        if 2 * len(answered) < max(len(nodes), 1):
            self.nodes.forget()
            return await read_subkeys(self.dht, self.nodes.key, timeout=max(0.1, deadline - time.monotonic()))
        newest: Dict[str, Tuple[Any, float]] = {}
        for copy in answered:
            for subkey, (value, expiration) in copy.items():
                if subkey not in newest or expiration > newest[subkey][1]:
                    newest[subkey] = (value, expiration)
        return {subkey: value for subkey, (value, _) in newest.items()}

    async def _read_one(self, node_id: Any, peer_id: Any, deadline: float) -> Optional[Dict[str, Tuple[Any, float]]]:
        """One node's copy ``{subkey: (value, expiration)}`` ({} if it holds none); None if it did not answer."""
        key_id = self.nodes.key_id
        if node_id == self.dht.node_id:
            entry = self.dht.protocol.storage.get(key_id)
            return {} if entry is None else _subkey_entries(self.dht, key_id, entry.value)
        try:
            return await asyncio.wait_for(_entries_at(self.dht, peer_id, key_id),
                                          max(0.1, min(DHT_RPC_TIMEOUT, deadline - time.monotonic())))
        except Exception as e:  # noqa: BLE001 - a node that does not answer is counted as such
            logger.debug("read of %s at a node failed: %r", self.nodes.key, e)
            return None


def read_local(dht: Any, key: str) -> Dict[str, Any]:
    """The unexpired subkeys of ``key`` that this node holds itself (pushed to it, or as one of its replicas);
    no RPC. Only records that passed the node's validator when they were stored are there."""
    from hivemind.dht.routing import DHTID

    key_id = DHTID.generate(source=key)
    entry = dht.protocol.storage.get(key_id)
    return {} if entry is None else _subkeys_of(dht, key_id, entry.value)


async def read_at(dht: Any, peer_id: Any, key: str) -> Dict[str, Any]:
    """The subkeys of ``key`` that the node ``peer_id`` holds (one RPC, no search; its answer is checked by our
    validator like any found record). {} if it holds none or did not answer."""
    from hivemind.dht.routing import DHTID

    key_id = DHTID.generate(source=key)
    entries = await _entries_at(dht, peer_id, key_id)
    return {subkey: value for subkey, (value, _) in (entries or {}).items()}


async def _entries_at(dht: Any, peer_id: Any, key_id: Any) -> Optional[Dict[str, Tuple[Any, float]]]:
    """``{subkey: (value, expiration)}`` of ``key_id`` on the node ``peer_id`` (one RPC; {} if it holds none);
    None if it did not answer."""
    found = await dht.protocol.call_find(peer_id, [key_id])
    if not found or key_id not in found:
        return None
    entry = found[key_id][0]
    return {} if entry is None else _subkey_entries(dht, key_id, entry.value)


def _subkeys_of(dht: Any, key_id: Any, value: Any) -> Dict[str, Any]:
    """``{subkey: value}`` of a dictionary record, signatures stripped; unreadable subkeys are left out."""
    return {subkey: item for subkey, (item, _) in _subkey_entries(dht, key_id, value).items()}


def _subkey_entries(dht: Any, key_id: Any, value: Any) -> Dict[str, Tuple[Any, float]]:
    """``{subkey: (value, expiration)}`` of a dictionary record, signatures stripped; unreadable subkeys are left
    out."""
    from hivemind.dht.storage import DictionaryDHTValue
    from hivemind.dht.validation import DHTRecord

    if not isinstance(value, DictionaryDHTValue):
        return {}
    proto, out = dht.protocol, {}
    for subkey, (value_bytes, expiration) in value.items():
        try:
            if proto.record_validator is not None:
                record = DHTRecord(key_id.to_bytes(), proto.serializer.dumps(subkey), value_bytes, expiration)
                value_bytes = proto.record_validator.strip_value(record)
            out[str(subkey)] = (proto.serializer.loads(value_bytes), float(expiration))
        except Exception:  # noqa: BLE001 - an unreadable record is no record
            continue
    return out


def dht_poll_pause(num_peers: int, *, least: float = 0.1) -> float:
    """The longest pause between two reads of a record that many peers may be waiting on at once (matchmaking,
    a round's done record): 10 ms per peer, within ``least`` … 2 s, so that all of them together read about 100
    times a second at most (a read costs ≈ 50 ms of CPU; at 0.1 s, 125 peers could keep 50 cores busy)."""
    return min(2.0, max(least, DHT_POLL_PER_PEER * num_peers))


async def poll_until(check, *, deadline: float, first_delay: float = 0.005, max_delay: float = 0.1) -> bool:
    """Await ``check()`` (a coroutine returning bool) with growing back-off until it is true or the deadline."""
    delay = first_delay
    while True:
        if await check():
            return True
        now = time.monotonic()
        if now >= deadline:
            return False
        await asyncio.sleep(min(delay, deadline - now))
        delay = min(delay * 1.5, max_delay)


def tree_children(order: Sequence[int], root: int, me: int, fanout: int = BARRIER_FANOUT) -> List[int]:
    """``me``'s children in the ``fanout``-ary tree over ``order`` (sorted indices) rooted at ``root``: position
    ``p`` (counted from the root, wrapping around) passes a barrier's completion on to positions
    ``fanout·p + 1 … fanout·p + fanout``, so every member is reached once, in ⌈log_fanout N⌉ hops."""
    n, start = len(order), order.index(root)
    position = (order.index(me) - start) % n
    first = fanout * position + 1
    return [order[(start + c) % n] for c in range(first, min(first + fanout, n))]


def _peer_id_value(value: Any) -> Optional[bytes]:
    """A peer id as a barrier record carries it; ``b""``: arrived, but not told where (nobody pushes to it)."""
    return value if isinstance(value, bytes) and len(value) <= 64 else None


def parse_card(value: Any) -> Optional[List[Any]]:
    """A barrier card from the wire: a list of at most :data:`CARD_ITEMS` ints and short strings; else None."""
    if not isinstance(value, list) or len(value) > CARD_ITEMS:
        return None
    ok = all(type(v) is int or (isinstance(v, str) and len(v) <= CARD_TEXT) for v in value)
    return value if ok else None


def parse_arrival(value: Any) -> Optional[Tuple[bytes, Optional[List[Any]]]]:
    """An arrival as a barrier record carries it: ``peer id`` or ``[peer id, card]`` (see :func:`async_barrier`);
    a card that does not parse is dropped, the arrival still counts."""
    if isinstance(value, list) and len(value) == 2 and _peer_id_value(value[0]) is not None:
        return value[0], parse_card(value[1])
    peer_id = _peer_id_value(value)
    return None if peer_id is None else (peer_id, None)


class Completion(NamedTuple):
    """Who arrived at a barrier: their peer ids (``b""``: not told) and the cards they carried."""

    ids: Dict[int, bytes]
    cards: Dict[int, List[Any]]


def parse_completion(value: Any, wanted: FrozenSet[int], limit: int) -> Optional[Completion]:
    """A pushed completion record, ``[[index, peer id(, card)], …]``: strictly shaped, in range, covering
    ``wanted``."""
    if not isinstance(value, list) or len(value) > limit:
        return None
    done = Completion({}, {})
    for item in value:
        if not (isinstance(item, list) and len(item) in (2, 3) and type(item[0]) is int and 0 <= item[0] < limit):
            return None
        peer_id, card = _peer_id_value(item[1]), parse_card(item[2]) if len(item) == 3 else None
        if peer_id is None or (len(item) == 3 and card is None):
            return None
        done.ids[item[0]] = peer_id
        if card is not None:
            done.cards[item[0]] = card
    return done if wanted <= done.ids.keys() else None


async def async_barrier(
    dht: Any, key: str, *, me: int, expected: Collection[int], timeout: float, ttl: float = 600.0,
    max_delay: Optional[float] = None, initial: Sequence[Any] = (), card: Optional[List[Any]] = None,
    cards: Optional[Dict[int, List[Any]]] = None,
) -> FrozenSet[int]:
    """Announce ``me`` under ``key`` and wait until all ``expected`` indices arrived or ``timeout`` passes.

    Arrivals are subkeys of ``key`` (the value: the arriving node's peer id, with our ``card`` if given: a few small
    values every other peer learns with the completion, see :func:`parse_card`; ``cards`` is filled with the cards
    of the arrivals we learn of). A peer reads the whole record right after its own arrival and then rarely (at most
    every ``max_delay`` s; by default 0.1 s per expected peer: every read returns every arrival, and 125 peers
    reading every 2.5 s kept two cores busy for minutes). Its stores and reads of the record go straight to the
    key's nodes, found by one search every :data:`BARRIER_NODES_REFRESH` s (:class:`KeyNodes`): under a one-core
    quota at 125 peers, 954 reads that were each a search (≈ 40 RPCs) made most of the DHT's calls during the start
    barrier. Whoever reads a complete record pushes the list of arrivals to the root of the barrier's one tree
    (:func:`completion_root`, :func:`tree_children`), and every peer that learns of it pushes it on to its children:
    one direct store per child into ``{key}.done`` on the child's own node; a peer checks that local copy, at no
    cost, every 0.2 s. A lost push only costs its subtree the slower reads. Whoever read the record complete also
    stores the completion on the ``initial`` peers (their peer ids), and every read also asks them: a peer whose
    pushes were all lost and whose own reads never showed every arrival (at 125 peers, 4-5 of them waited out the
    10-minute start deadline) learns it there within one read. Arrivals are stored on the initial peers too, and
    read there (one RPC for the whole record): at 125 peers on two cores the DHT's copies took 7-10 minutes to show
    every arrival to anybody. Their copy of the completion is read every 0.01 s per expected peer (0.2 … 2 s), their
    copy of the arrivals every 0.05 s per expected peer, each apart from the DHT read: waiting for a DHT search that
    was under way when the completion landed on the initial peers kept some of 64 peers 10 s longer in the start
    barrier.
    """
    deadline = time.monotonic() + timeout
    # no DHT call holds the barrier: on an overloaded DHT (125 peers on 2 cores) one store or read could outlast
    # its deadline (a peer that had finished every round died of its end barrier), and an arrival whose store
    # did not land (its key's nodes too busy to answer) is stored again whenever a read does not show it
    nodes = KeyNodes(dht, key, refresh=BARRIER_NODES_REFRESH)  # one search serves our stores and reads of the key
    reader = RepeatedRead(dht, key, nodes=nodes)
    arrival = _announce(dht, key, me, ttl, initial, until=deadline, card=card, nodes=nodes)
    wanted = frozenset(expected)
    if max_delay is None:
        max_delay = max(0.1, len(wanted) * BARRIER_POLL_PER_PEER)
    # the initial peers' copies cost one RPC each: the completion (small, empty until it lands) is read there
    # often, the arrivals (one subkey per peer, each checked) less often, the whole DHT record rarely (see above)
    quick = min(max_delay, dht_poll_pause(len(wanted), least=BARRIER_LOCAL_CHECK))
    every = {"done": quick, "arrivals": max(quick, len(wanted) * BARRIER_ARRIVALS_READ_PER_PEER)}
    limit = max(wanted | {me}) + 1  # subkeys outside the expected range are nobody we wait for
    done_key, pause = f"{key}.done", min(0.2, max_delay)
    record: Dict[str, Any] = {}  # every arrival any read showed (an arrival stays for ttl: none is taken back)
    # three reads run beside the local checks, each at its own pace: a push ends the wait at once
    reads: Dict[str, Optional[asyncio.Future]] = {"done": None, "arrivals": None, "dht": None}
    start = time.monotonic() if initial else math.inf
    next_read = {"done": start, "arrivals": start, "dht": time.monotonic()}
    read_started: Dict[str, float] = {}

    def completions(copy: Mapping[str, Any]) -> Dict[int, Completion]:
        return {root: done for root, done in ((_barrier_index(s, limit), parse_completion(v, wanted, limit))
                                              for s, v in copy.items()) if root is not None and done is not None}

    def arrivals() -> FrozenSet[int]:
        return frozenset(i for i in (_barrier_index(s, limit) for s in record) if i is not None) | {me}

    def read_from_record(indices: Iterable[int]) -> Completion:
        parsed = {i: parse_arrival(record.get(str(i))) for i in indices}
        done = Completion({i: a[0] if a else b"" for i, a in parsed.items()},
                          {i: a[1] for i, a in parsed.items() if a and a[1] is not None})
        done.ids[me] = dht.peer_id.to_bytes()  # our arrival may be in flight
        if card is not None:
            done.cards[me] = card
        return done

    def leave(done: Completion) -> FrozenSet[int]:
        if cards is not None:
            cards.update(done.cards)
        return frozenset(done.ids) | {me}

    try:
        while True:
            pushed, read_it = completions(read_local(dht, done_key)), False
            now = time.monotonic()
            for source, future in reads.items():
                if not pushed and future is None and now >= next_read[source]:
                    read_started[source] = now
                    reads[source] = asyncio.ensure_future(
                        _read_dht_copy(reader) if source == "dht"
                        else _read_initial_copies(dht, done_key if source == "done" else key, initial))
                elif not pushed and future is not None and future.done():
                    reads[source] = None
                    if source == "done":
                        pushed = completions(future.result())
                    else:
                        record.update(future.result())
                    if source == "dht":
                        if str(me) not in record and arrival.done():
                            # the initial peers' copies retry on their own
                            arrival = _announce(dht, key, me, ttl, card=card, nodes=nodes)
                        next_read["dht"], pause = now + pause, min(2 * pause, max_delay)
                    else:  # spaced by its own duration too: a busy initial peer is not asked faster than it answers
                        next_read[source] = now + max(every[source], now - read_started[source])
            if not pushed and wanted <= arrivals():
                pushed, read_it = {me: read_from_record(wanted)}, True
            if pushed:
                done = next(iter(pushed.values()))
                passing = _pass_completion_on(dht, done_key, done.ids, me=me, ttl=ttl, read_it=read_it,
                                              initial=initial if read_it else (), cards=done.cards)
                if passing is not None:  # hand it on before this peer goes to work (see BARRIER_PASS_ON)
                    await asyncio.wait({passing}, timeout=max(0.0, min(BARRIER_PASS_ON, deadline - now)))
                return leave(done)
            if now >= deadline:
                if not arrival.done() or str(me) not in record:
                    logger.warning("barrier %s: our arrival may not have been stored before the deadline", key)
                return leave(read_from_record(arrivals()))
            pending = [f for f in reads.values() if f is not None]
            wake = min(BARRIER_LOCAL_CHECK, deadline - now, *(t - now for s, t in next_read.items() if not reads[s]))
            if pending:
                await asyncio.wait(pending, timeout=max(0.0, wake))
            else:
                await asyncio.sleep(max(0.0, wake))
    finally:
        for future in reads.values():
            if future is not None:
                future.cancel()


_PUSHES: Set[asyncio.Future] = set()  # arrivals and completion pushes in flight (kept referenced until they end)


def _merged(key: str, copies: Sequence[Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for copy in copies:
        if isinstance(copy, BaseException):
            logger.debug("barrier %s: a copy unread: %r", key, copy)
        else:
            out.update(copy)
    return out


async def _read_initial_copies(dht: Any, key: str, initial: Sequence[Any]) -> Dict[str, Any]:
    """``key`` as the ``initial`` peers hold it (one RPC each, merged; a copy that could not be read left out)."""
    copies = await asyncio.gather(*(asyncio.wait_for(read_at(dht, p, key), DHT_RPC_TIMEOUT) for p in initial),
                                  return_exceptions=True)
    return _merged(key, copies)


async def _read_dht_copy(reader: RepeatedRead) -> Dict[str, Any]:
    """A barrier's arrivals as its key's nodes hold them (:class:`RepeatedRead`: one RPC each; seconds on a busy
    DHT). {} if the read failed."""
    return _merged(reader.nodes.key, await asyncio.gather(reader.read(), return_exceptions=True))


def _announce(dht: Any, key: str, me: int, ttl: float, initial: Sequence[Any] = (), *,
              until: float = math.inf, card: Optional[List[Any]] = None,
              nodes: Optional[KeyNodes] = None) -> asyncio.Future:
    """Store our arrival under ``key`` in the background (the value: our peer id, where a completion is pushed,
    and our ``card`` if any), on the key's ``nodes`` (:class:`Renewal`) and straight on the ``initial`` peers, each
    try bounded by
    :data:`DHT_READ_TIMEOUT`; the future's result says whether some node took it (the DHT copy, or an initial
    peer at its first try).

    A copy on an initial peer that did not land is tried again (1, 2, 4, 5, 5 ... s apart, and never sooner than
    the last try took) until it does or ``until`` passes, on its own: every waiting peer reads those copies every
    few seconds, the DHT's only rarely.
    At 125 peers more than half of the DHT stores of a start's first 20 s failed, and an arrival whose DHT copy
    had landed was never stored on the initial peers again: the others saw it only in their rare DHT reads."""
    value = dht.peer_id.to_bytes() if card is None else [dht.peer_id.to_bytes(), card]

    async def store_one(stored: Awaitable[bool]) -> bool:
        try:
            return await asyncio.wait_for(stored, DHT_READ_TIMEOUT)
        except Exception as e:  # noqa: BLE001 - stored again (see above)
            logger.debug("barrier %s: storing our arrival failed: %r", key, e)
            return False

    async def store_on(peer_id: Any, first: asyncio.Future) -> None:
        pause = 1.0
        try:
            while True:
                tried = time.monotonic()
                landed = await store_one(store_at(dht, peer_id, key, str(me), value, ttl=ttl))
                if not first.done():
                    first.set_result(landed)
                wait = max(pause, time.monotonic() - tried)  # a store that timed out waits as long again
                if landed or time.monotonic() + wait >= until:
                    return
                await asyncio.sleep(wait)
                pause = min(2 * pause, BARRIER_PUSH_RETRY)
        finally:
            if not first.done():
                first.set_result(False)

    async def store() -> bool:
        firsts = [asyncio.get_running_loop().create_future() for _ in initial]
        for peer_id, first in zip(initial, firsts):
            _keep(asyncio.ensure_future(store_on(peer_id, first)))
        dht_copy = Renewal(dht, key, nodes=nodes).store(str(me), value, ttl=ttl)
        return any(await asyncio.gather(store_one(dht_copy), *firsts))

    return _keep(asyncio.ensure_future(store()))


def _keep(task: asyncio.Future) -> asyncio.Future:
    """Hold a background store or push referenced until it ends (see :data:`_PUSHES`)."""
    _PUSHES.add(task)
    task.add_done_callback(_PUSHES.discard)
    return task


def completion_root(reachable: Sequence[int], done_key: str) -> int:
    """The root of a barrier's completion tree: one per barrier, the same for every peer (drawn from the key,
    so that the first pushes of successive barriers start at different peers)."""
    digest = hashlib.sha256(done_key.encode()).digest()
    return reachable[int.from_bytes(digest[:8], "big") % len(reachable)]


def _pass_completion_on(dht: Any, done_key: str, ids: Dict[int, bytes], *, me: int, ttl: float,
                        read_it: bool = False, initial: Sequence[Any] = (),
                        cards: Optional[Mapping[int, List[Any]]] = None) -> Optional[asyncio.Future]:
    """Push the completion of a barrier to our children in its one tree (:func:`completion_root`), in the
    background. Every peer does so when it learns of the completion, by a push or by its own read: a peer that
    read the record complete before its parent pushed to it still serves its own subtree (with a tree rooted at
    whoever read first, such a peer had left the barrier and its children waited for their own slow reads). A
    peer that ``read_it`` (rather than was pushed it) also pushes to the root, which starts the tree. A child
    that does not take the push (gone, or too busy to answer within one DHT call's timeout) does not cost its
    subtree the push: we push to its children ourselves. The completion is also stored on the ``initial``
    peers (their peer ids), where every waiting peer's reads look. The arrivals' ``cards`` go with it. Returns
    the pushes (None: nothing to push),
    which go on in the background whether or not anybody waits for them."""
    from hivemind.p2p import PeerID

    cards = cards or {}
    value = [[i, ids[i]] + ([cards[i]] if i in cards else []) for i in sorted(ids)]
    reachable = sorted(i for i, peer_id in ids.items() if peer_id)
    if me not in reachable:
        return None
    root = completion_root(reachable, done_key)

    async def stored_at(child: int) -> bool:
        try:
            return await asyncio.wait_for(
                store_at(dht, PeerID(ids[child]), done_key, str(root), value, ttl=ttl), DHT_RPC_TIMEOUT)
        except Exception as e:  # noqa: BLE001 - handled by the caller, like a refusal
            logger.debug("barrier %s: pushing completion to peer %d failed: %r", done_key, child, e)
            return False

    async def push(child: int) -> None:
        if not await stored_at(child):  # its subtree is pushed to at once, the child itself again a few times
            # return_exceptions: a push cut short at shutdown leaves no "exception was never retrieved" ERROR line
            await asyncio.gather(*(push(grandchild) for grandchild in tree_children(reachable, root, child)),
                                 push_again(child), return_exceptions=True)

    async def push_again(child: int) -> None:
        # a leaf that missed its one push waited for its own reads until the deadline (5 of 125 peers, 10 min)
        for _ in range(BARRIER_PUSH_RETRIES):
            await asyncio.sleep(BARRIER_PUSH_RETRY)
            if await stored_at(child):
                return
        logger.info("barrier %s: the completion could not be pushed to peer %d", done_key, child)

    async def store_initial(peer_id: Any) -> None:
        try:
            await asyncio.wait_for(store_at(dht, peer_id, done_key, str(root), value, ttl=ttl), DHT_RPC_TIMEOUT)
        except Exception as e:  # noqa: BLE001 - the tree's pushes and the peers' own reads remain
            logger.debug("barrier %s: storing the completion on an initial peer failed: %r", done_key, e)

    targets = tree_children(reachable, root, me) + ([root] if read_it and me != root else [])
    return _keep(asyncio.ensure_future(asyncio.gather(*(push(target) for target in targets),
                                                      *(store_initial(p) for p in initial), return_exceptions=True)))


def _barrier_index(subkey: Any, limit: int) -> Optional[int]:
    """ASCII digits only, below ``limit``: a malformed subkey is ignored, never a crash or an alias."""
    if isinstance(subkey, str) and 0 < len(subkey) <= 10 and subkey.isascii() and subkey.isdigit():
        return int(subkey) if int(subkey) < limit else None
    return None


def barrier(
    network: PeerNetwork, key: str, *, me: int, expected: Iterable[int], timeout: float,
    max_delay: Optional[float] = None, card: Optional[List[Any]] = None, cards: Optional[Dict[int, List[Any]]] = None,
) -> FrozenSet[int]:
    """Synchronous wrapper of :func:`async_barrier`; returns the indices that arrived before the deadline. A wait
    that overruns its deadline by :data:`BARRIER_OVERRUN` s (the network loop was held up: seen once at 125 peers,
    where it killed the peer) ends like one that reached it, knowing only ``me``."""
    from concurrent.futures import TimeoutError as Overrun

    coro = async_barrier(network.dht, key, me=me, expected=list(expected), timeout=timeout, max_delay=max_delay,
                         initial=network.initial_peer_ids(), card=card, cards=cards)
    try:
        return network.run(coro, timeout=timeout + BARRIER_OVERRUN)
    except Overrun:
        logger.warning("barrier %s: the wait overran its %.0f-s deadline by %.0f s; going on without knowing who "
                       "arrived", key, timeout, BARRIER_OVERRUN)
        return frozenset({me})


# ==================== sitting a round out ====================
# A peer that does not aggregate in a round has nothing to wait for in it. Were it to go straight on, it would
# declare itself in next round's groups while their other members are still averaging this round (or several
# rounds back, if it sits out again): its matchmaking deadline would count from its early arrival, the wait would
# show as its round's duration, and past the deadline it would leave its group-mates averaging alone. So it waits
# here, as a peer that aggregates waits for its group-mates: until every aggregating peer of the round that still
# runs has said it is done, or until the round stops making progress for ``patience`` seconds.

DONE_POLL_DELAYS = (0.05, 0.2)  # first and largest pause between two reads of a round's done record
RUNNING_READ_EVERY = 1.0  # liveness records change every few seconds: read them at most this often


@dataclass(frozen=True)
class RoundWait:
    """How a wait for a round's aggregating peers ended."""

    seconds: float
    pending: FrozenSet[int]  # aggregating peers still at work when the wait gave up (empty: the round finished)


def round_done_key(prefix: str, round_index: int) -> str:
    """One key per round; each aggregating peer adds its index as a subkey once its aggregation is over."""
    return f"{prefix}.done.r{round_index}"


def announce_round_done(network: PeerNetwork, key: str, *, me: int, ttl: float = 600.0) -> None:
    """Publish our done subkey without waiting for the store (it must not delay our next round); a failure is
    logged: peers that wait for us then stop at their deadline, or when our liveness record names a later round."""

    def report(future) -> None:
        failure = None if future.cancelled() else future.exception()
        if failure is not None or (not future.cancelled() and future.result() is False):
            logger.warning("round done record %s not stored: %r", key, failure)

    future = asyncio.run_coroutine_threadsafe(publish(network.dht, key, str(me), True, ttl=ttl), network.loop)
    future.add_done_callback(report)


def parse_done(record: Mapping[str, Any], num_peers: int) -> FrozenSet[int]:
    """The indices in a round's done record: digit subkeys below ``num_peers`` whose value is ``True``."""
    return frozenset(i for sub, value in record.items()
                     if value is True and (i := _barrier_index(sub, num_peers)) is not None)


def still_working(*, participants: Collection[int], done: Collection[int], running: Optional[Mapping[int, int]],
                  round_index: int) -> FrozenSet[int]:
    """The aggregating peers of ``round_index`` that a peer sitting the round out still waits for (pure).

    :param participants: the round's aggregating peers
    :param done: those that published their done subkey
    :param running: index -> round named by each unexpired liveness record (a peer's newest aggregation round);
        None when unknown, then everybody not done counts as working
    :param round_index: the round waited for
    :return: participants not done whose liveness record exists and names no later round (a peer whose record
        expired is gone; one whose record names a later round is past this one even if its done record was lost)
    """
    pending = frozenset(participants) - frozenset(done)
    if running is None:
        return pending
    return frozenset(i for i in pending if i in running and running[i] <= round_index)


def wait_for_round(network: PeerNetwork, key: str, *, me: int, participants: Collection[int], round_index: int,
                   num_peers: int, running: Callable[[], Mapping[int, int]], patience: float) -> RoundWait:
    """Poll a round's done record until :func:`still_working` is empty or ``patience`` seconds pass without a new
    participant finishing (so the wait ends at the latest ``(len(participants) + 1) * patience`` after it began).

    :param network: this peer's network runtime
    :param key: the round's done key (:func:`round_done_key`)
    :param me: this peer's index (its own liveness record must be in a ``running`` read for the read to count)
    :param participants: the round's aggregating peers
    :param round_index: the round waited for
    :param num_peers: peer indices on the wire lie below this
    :param running: reads the liveness records (index -> round); may raise
    :param patience: seconds without progress after which the wait gives up
    """
    started = time.monotonic()
    deadline, delay = started + patience, DONE_POLL_DELAYS[0]
    reader = RepeatedRead(network.dht, key)
    done: FrozenSet[int] = frozenset()
    alive: Optional[Mapping[int, int]] = None
    alive_read = -math.inf
    while True:
        now = time.monotonic()
        if now - alive_read >= RUNNING_READ_EVERY:
            alive, alive_read = _read_running(running, me), now
        try:
            seen = parse_done(network.run(reader.read(timeout=DHT_RPC_TIMEOUT), timeout=DHT_RPC_TIMEOUT + 1), num_peers)
        except Exception as e:  # noqa: BLE001 - read again until the deadline
            logger.debug("done record %s unreadable: %r", key, e)
            seen = frozenset()
        if seen - done:  # progress: the round is still moving, give the others as long again
            deadline = time.monotonic() + patience
        done |= seen
        pending = still_working(participants=participants, done=done, running=alive, round_index=round_index)
        now = time.monotonic()
        if not pending or now >= deadline:
            return RoundWait(seconds=now - started, pending=pending)
        time.sleep(min(delay, deadline - now))
        delay = min(delay * 1.5, dht_poll_pause(num_peers, least=DONE_POLL_DELAYS[1]))


def _read_running(running: Callable[[], Mapping[int, int]], me: int) -> Optional[Mapping[int, int]]:
    """The liveness view, or None when it cannot be trusted (the read failed or lacks our own record)."""
    try:
        view = running()
    except Exception as e:  # noqa: BLE001 - without a view we wait for everybody not done
        logger.debug("liveness read failed: %r", e)
        return None
    return view if me in view else None


# ==================== the cluster data plane (--transport tcp) ====================

_PLANE_MAGIC = b"MFL1"
_HELLO = struct.Struct("!4sQ16s")  # magic, sender's peer index, nonce
_FRAME = struct.Struct("!4s20sBQ")  # magic, group id, phase, payload bytes
_MAC_BYTES = 32
HANDSHAKE_TIMEOUT = 10.0
MAX_UNCLAIMED_FRAMES = 8  # frames of a peer kept for a step that has not asked for them (yet); older ones go


class PlaneError(ConnectionError):
    """A data-plane connection failed, was refused, or its peer broke the protocol."""


@dataclass
class _Inbox:
    """Frames one peer sent us, by ``(group id, phase)``, each waited for by at most one reader."""

    frames: Dict[Tuple[bytes, int], "asyncio.Future[np.ndarray]"]
    broken: Optional[BaseException] = None


class TcpPlane:
    """Authenticated TCP connections between the peers of one run, carrying framed byte buffers.

    The data plane of ``--transport tcp``: for a cluster, where libp2p's per-message path (a ``p2pd`` per peer,
    protobuf, encrypted streams) costs many times what the bytes cost. Each peer listens on one port (published
    in the run's authenticated DHT records by the averager). A connection is admitted only after both ends prove
    they hold the run secret (HMAC-SHA256 over both nonces and both peer indices, so a stranger cannot connect
    and a member cannot replay another's handshake); frames are then plain, unencrypted bytes: use this
    transport on networks you trust not to be tapped, and libp2p elsewhere.

    A frame is ``(group id, phase, payload)``; a reader task per connection files frames into the sender's inbox,
    where :meth:`receive` picks them up with a deadline. Of the frames nobody asked for yet, a peer's newest
    :data:`MAX_UNCLAIMED_FRAMES` are kept (memory stays bounded); a frame larger than :attr:`max_frame_bytes`
    disconnects its sender. Any end may dial any
    other; both connections of a pair are used (frames are keyed, not ordered).

    :param index: this peer's index (sent in the handshake, checked by the other end's HMAC)
    :param secret: the run secret (at least 16 bytes)
    :param host: the address to listen on (``0.0.0.0`` for all)
    :param num_peers: indices at or above this are refused
    """

    def __init__(self, *, index: int, secret: bytes, host: str, num_peers: int):
        if len(secret) < 16:
            raise ValueError("the run secret must be at least 16 bytes")
        self.index, self._secret, self.host, self.num_peers = index, bytes(secret), host, num_peers
        self.max_frame_bytes = 1 << 30  # until the averager says how large its payloads are (:meth:`allow_frames`)
        self._frames_known = False
        self.port = 0
        self._server: Optional[Any] = None
        self._accepting: Optional[asyncio.Task] = None
        self._conns: Dict[int, List[Tuple[Any, asyncio.Lock]]] = {}
        self._inboxes: Dict[int, _Inbox] = {}
        self._tasks: set = set()

    # ---------- connections ----------

    async def start(self) -> int:
        """Listen on ``host`` (a free port); returns the port."""
        import socket

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        server = socket.socket(family, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((self.host, 0))
        server.listen(256)
        server.setblocking(False)
        self._server, self.port = server, server.getsockname()[1]
        self._accepting = asyncio.create_task(self._accept_forever())
        return self.port

    async def _accept_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self._server)
            self._spawn(self._admit(sock))

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _mac(self, role: bytes, nonce_dialer: bytes, nonce_listener: bytes, dialer: int, listener: int) -> bytes:
        message = role + nonce_dialer + nonce_listener + dialer.to_bytes(8, "big") + listener.to_bytes(8, "big")
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    async def _admit(self, sock) -> None:
        """Listener's side of the handshake; a connection that fails it is closed without a word."""
        try:
            loop = asyncio.get_running_loop()
            magic, dialer, nonce_d = _HELLO.unpack(await _recv_exactly(sock, _HELLO.size, HANDSHAKE_TIMEOUT))
            if magic != _PLANE_MAGIC or not 0 <= dialer < self.num_peers or dialer == self.index:
                raise PlaneError(f"bad hello (peer {dialer})")
            nonce_l = os.urandom(16)
            await loop.sock_sendall(sock, _HELLO.pack(_PLANE_MAGIC, self.index, nonce_l)
                                    + self._mac(b"L", nonce_d, nonce_l, dialer, self.index))
            proof = await _recv_exactly(sock, _MAC_BYTES, HANDSHAKE_TIMEOUT)
            if not hmac.compare_digest(bytes(proof), self._mac(b"D", nonce_d, nonce_l, dialer, self.index)):
                raise PlaneError(f"peer {dialer} does not hold the run secret")
        except (OSError, asyncio.TimeoutError, struct.error) as e:
            logger.warning("data plane: refused a connection: %r", e)
            sock.close()
            return
        self._register(dialer, sock)

    async def connect(self, peer: int, host: str, port: int) -> None:
        """Dial ``peer`` at ``host:port`` unless a connection to it is open; raises :class:`PlaneError`."""
        import socket

        if self._conns.get(peer):
            return
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), HANDSHAKE_TIMEOUT)
            nonce_d = os.urandom(16)
            await loop.sock_sendall(sock, _HELLO.pack(_PLANE_MAGIC, self.index, nonce_d))
            reply = await _recv_exactly(sock, _HELLO.size + _MAC_BYTES, HANDSHAKE_TIMEOUT)
            magic, listener, nonce_l = _HELLO.unpack(reply[:_HELLO.size])
            if magic != _PLANE_MAGIC or listener != peer or not hmac.compare_digest(
                    bytes(reply[_HELLO.size:]), self._mac(b"L", nonce_d, nonce_l, self.index, peer)):
                raise PlaneError(f"{host}:{port} is not peer {peer} of this run")
            await loop.sock_sendall(sock, self._mac(b"D", nonce_d, nonce_l, self.index, peer))
        except (OSError, asyncio.TimeoutError, struct.error) as e:
            sock.close()
            raise e if isinstance(e, PlaneError) else PlaneError(f"cannot reach peer {peer} at {host}:{port}: {e!r}")
        if self._conns.get(peer):  # the other end dialled us meanwhile: one connection is enough
            sock.close()
            return
        self._register(peer, sock)

    def allow_frames(self, nbytes: int) -> None:
        """Frames up to ``nbytes`` (the largest payload of the averager so far) are accepted, no larger."""
        self.max_frame_bytes = max(self.max_frame_bytes, nbytes) if self._frames_known else nbytes
        self._frames_known = True

    def connected(self, peer: int) -> bool:
        return bool(self._conns.get(peer))

    def _register(self, peer: int, sock) -> None:
        import socket

        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        self._conns.setdefault(peer, []).append((sock, asyncio.Lock()))
        inbox = self._inboxes.get(peer)
        if inbox is None or inbox.broken is not None:
            self._inboxes[peer] = _Inbox({})
        self._spawn(self._read_forever(peer, sock))

    def _drop(self, peer: int, sock, why: BaseException) -> None:
        conns = [c for c in self._conns.get(peer, []) if c[0] is not sock]
        self._conns[peer] = conns
        sock.close()
        if not conns:  # nothing more can come from this peer: wake whoever waits for it
            inbox = self._inboxes.get(peer)
            if inbox is not None:
                inbox.broken = why
                for key, future in list(inbox.frames.items()):
                    if not future.done():  # frames that did arrive stay readable
                        future.set_exception(PlaneError(f"connection to peer {peer} lost: {why!r}"))
                        del inbox.frames[key]

    # ---------- frames ----------

    async def _read_forever(self, peer: int, sock) -> None:
        try:
            while True:
                header = await _recv_exactly(sock, _FRAME.size, None)
                magic, group_id, phase, size = _FRAME.unpack(header)
                if magic != _PLANE_MAGIC or size > self.max_frame_bytes:
                    raise PlaneError(f"peer {peer} sent a malformed frame ({size} bytes)")
                # filed by a call, not through a local: this loop waits for the next frame for as long as the
                # peer is quiet, and a local would keep the last payload (a whole shard) alive until then
                self._file_frame(peer, (group_id, phase), await _recv_exactly(sock, size, None))
        except asyncio.CancelledError:
            sock.close()
            raise
        except (OSError, struct.error) as e:
            self._drop(peer, sock, e)

    def _file_frame(self, peer: int, key: Tuple[bytes, int], payload: np.ndarray) -> None:
        inbox = self._inboxes[peer]
        future = inbox.frames.get(key)
        if future is None:
            unclaimed = [k for k, f in inbox.frames.items() if f.done()]
            if len(unclaimed) >= MAX_UNCLAIMED_FRAMES:  # late or surplus frames: the oldest goes
                logger.debug("data plane: dropped an unclaimed frame of peer %d", peer)
                del inbox.frames[unclaimed[0]]
            future = inbox.frames[key] = asyncio.get_running_loop().create_future()
        if future.done():
            raise PlaneError(f"peer {peer} sent a frame twice")
        future.set_result(payload)

    async def send(self, peer: int, group_id: bytes, phase: int, payload) -> int:
        """Send one frame to ``peer`` (which must be connected); returns the bytes put on the wire."""
        conns = self._conns.get(peer)
        if not conns:
            raise PlaneError(f"not connected to peer {peer}")
        sock, lock = conns[0]
        view = memoryview(payload).cast("B")
        loop = asyncio.get_running_loop()
        async with lock:
            try:
                await loop.sock_sendall(sock, _FRAME.pack(_PLANE_MAGIC, group_id, phase, view.nbytes))
                await loop.sock_sendall(sock, view)
            except OSError as e:
                self._drop(peer, sock, e)
                raise PlaneError(f"sending to peer {peer} failed: {e!r}") from e
        return _FRAME.size + view.nbytes

    async def receive(self, peer: int, group_id: bytes, phase: int, *, timeout: float) -> np.ndarray:
        """The frame ``(group id, phase)`` from ``peer`` (a uint8 array), waited for at most ``timeout`` seconds."""
        key = (group_id, phase)
        inbox = self._inboxes.setdefault(peer, _Inbox({}))  # its connection may still be in its handshake
        future = inbox.frames.get(key)
        if future is None:
            if inbox.broken is not None:
                raise PlaneError(f"connection to peer {peer} lost: {inbox.broken!r}")
            future = inbox.frames[key] = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(asyncio.shield(future), max(0.0, timeout))
        finally:
            if inbox.frames.get(key) is future:
                del inbox.frames[key]

    def has_frame(self, peer: int, group_id: bytes, phase: int) -> bool:
        """Whether the frame ``(group id, phase)`` from ``peer`` has arrived (without consuming it)."""
        inbox = self._inboxes.get(peer)
        future = None if inbox is None else inbox.frames.get((group_id, phase))
        return future is not None and future.done() and not future.exception()

    def forget(self, group_id: bytes) -> None:
        """Drop frames of a finished exchange that were never read (a group-mate's late or extra frames)."""
        for inbox in self._inboxes.values():
            for key in [k for k in inbox.frames if k[0] == group_id]:
                inbox.frames.pop(key)

    async def close(self) -> None:
        tasks = list(self._tasks) + ([self._accepting] if self._accepting is not None else [])
        for task in tasks:
            task.cancel()
        # a cancelled read leaves its socket on the selector until a callback of asyncio's runs: wait for that
        # before closing. Closed at once, a socket gave its file descriptor to the next one opened (a p2pd
        # connection, at shutdown), and the late callback took that one's reader away or hit its transport
        await asyncio.gather(*tasks, return_exceptions=True)
        for conns in self._conns.values():
            for sock, _ in conns:
                sock.close()
        self._conns.clear()
        if self._server is not None:
            self._server.close()


async def _recv_exactly(sock, size: int, timeout: Optional[float]) -> np.ndarray:
    """``size`` bytes from a non-blocking socket, straight into one (uninitialised) uint8 array; :class:`PlaneError`
    (an ``OSError``, like every other way a connection fails) if it closes first."""
    buffer = np.empty(size, dtype=np.uint8)
    view, got = memoryview(buffer), 0
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else time.monotonic() + timeout
    while got < size:
        if deadline is None:
            n = await loop.sock_recv_into(sock, view[got:])
        else:
            n = await asyncio.wait_for(loop.sock_recv_into(sock, view[got:]), max(0.0, deadline - time.monotonic()))
        if n == 0:
            raise PlaneError(f"connection closed after {got} of {size} bytes")
        got += n
    return buffer


def frame_bytes(payload_bytes: int) -> int:
    """Bytes a frame of ``payload_bytes`` takes on the wire (header included)."""
    return _FRAME.size + payload_bytes


def parse_endpoint(value: Any) -> Optional[Tuple[str, int]]:
    """A data-plane endpoint record ``[host, port]`` from the wire: an IP address and a port; else None."""
    import ipaddress

    if not (isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str)
            and type(value[1]) is int and 0 < value[1] < 65536 and len(value[0]) <= 64):
        return None
    try:
        return str(ipaddress.ip_address(value[0])), value[1]
    except ValueError:
        return None


def reachable_host(host: str, announce_host: Optional[str], advertised: Sequence[str]) -> str:
    """The address group-mates dial for our data plane: the announced host, else the listening one, else (when
    listening on all interfaces) the first address of our advertised multiaddrs."""
    if announce_host:
        return announce_host
    if host not in ("0.0.0.0", "::"):
        return host
    from hivemind.utils.multiaddr import Multiaddr

    for maddr in advertised:
        address = _component(Multiaddr(maddr), "ip4") or _component(Multiaddr(maddr), "ip6")
        if address:
            return address
    raise SyncError("no address to announce for the data plane")
