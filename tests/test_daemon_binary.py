"""hivemind's p2pd: unpacked once so that the daemons of a host share its code pages, and run without relaying."""
import json
import os
import struct
import subprocess
import time

import pytest

import peer_synchronization as ps


@pytest.fixture(scope="module")
def packed() -> bytes:
    with open(ps.packed_daemon_path(), "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def unpacked(packed) -> bytes:
    return ps.upx_unpack_elf(packed)


def _mappings(pid: int) -> list:
    with open(f"/proc/{pid}/maps") as f:
        return [line.split() for line in f]


def _segments(elf: bytes) -> list:
    """(vaddr, offset, size, writable) of each loadable segment."""
    phoff, phnum = struct.unpack_from("<Q", elf, 32)[0], struct.unpack_from("<H", elf, 56)[0]
    rows = [ps._PHDR.unpack_from(elf, phoff + k * ps._PHDR.size) for k in range(phnum)]
    return [(p[3], p[2], p[5], bool(p[1] & 2)) for p in rows if p[0] == ps._PT_LOAD]


def test_the_unpacked_daemon_holds_the_code_the_packed_one_runs(packed, unpacked, tmp_path):
    """The packed daemon, once it has unpacked itself in memory, runs exactly our file's read-only segments."""
    proc = subprocess.Popen([ps.packed_daemon_path(), f"-listen=/unix{tmp_path}/d.sock",
                             "-hostAddrs=/ip4/127.0.0.1/tcp/0"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(tmp_path / "d.sock") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None and os.path.exists(tmp_path / "d.sock"), "the packed daemon did not start"
        compared = 0
        with open(f"/proc/{proc.pid}/mem", "rb") as mem:
            for vaddr, offset, size, writable in _segments(unpacked):
                if writable:
                    continue  # the Go runtime has written to its data by now
                mem.seek(vaddr)
                image = bytearray(mem.read(size))
                if offset == 0:  # our copy has no section headers
                    image[40:48], image[60:64] = bytes(8), bytes(4)
                assert bytes(image) == unpacked[offset: offset + size], f"segment at {vaddr:#x} differs"
                compared += size
        assert compared > 20_000_000  # code and read-only data, most of the binary
    finally:
        proc.kill()
        proc.wait()


def test_the_unpacked_daemon_runs(tmp_path, monkeypatch, unpacked):
    monkeypatch.setenv("MARFL_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(ps.DAEMON_ENV, raising=False)
    monkeypatch.setattr(ps, "upx_unpack_elf", lambda data: unpacked)  # unpacked once for the module
    assert ps.daemon_binary() == ps.packed_daemon_path()  # nothing prepared in this cache yet
    path = ps.prepare_daemon_binary()
    assert path.startswith(str(tmp_path)) and os.path.basename(path) == "p2pd"  # leak checks look for the name
    assert ps.daemon_binary() == path
    stamp = os.stat(path).st_mtime_ns
    assert ps.prepare_daemon_binary() == path and os.stat(path).st_mtime_ns == stamp  # unpacked only once
    out = subprocess.run([path, "-h"], capture_output=True, text=True, timeout=30)
    assert "-listen" in out.stderr + out.stdout


def test_a_peer_network_maps_the_daemon_code_from_the_shared_file(unpacked_daemon, no_new_p2pd):
    network = ps.PeerNetwork(ps.NetworkOptions()).start()
    try:
        pid = network.p2pd_pid
        assert os.path.realpath(f"/proc/{pid}/exe") == os.path.realpath(unpacked_daemon)
        code = [m for m in _mappings(pid) if "x" in m[1] and len(m) >= 6]
        assert code and all(os.path.realpath(m[5]) == os.path.realpath(unpacked_daemon) for m in code[:1])
    finally:
        network.shutdown()


def test_an_explicit_daemon_wins(monkeypatch):
    monkeypatch.setenv(ps.DAEMON_ENV, "/opt/p2pd")
    assert ps.daemon_binary() == "/opt/p2pd" and ps.prepare_daemon_binary() == "/opt/p2pd"


def test_a_daemon_that_cannot_be_unpacked_runs_packed(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MARFL_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(ps.DAEMON_ENV, raising=False)

    def refuse(data):
        raise ps.PackedBinaryError("unsupported block (method 14, filter 73)")

    monkeypatch.setattr(ps, "upx_unpack_elf", refuse)
    assert ps.prepare_daemon_binary() == ps.packed_daemon_path()
    assert ps.daemon_binary() == ps.packed_daemon_path()
    assert "cannot unpack" in caplog.text and not os.listdir(tmp_path)


def _block_at(packed: bytes, k: int) -> int:
    pos = 64 + struct.unpack_from("<H", packed, 56)[0] * ps._PHDR.size + ps._UPX_LINFO_PINFO.size
    for _ in range(k):
        pos += ps._UPX_BLOCK.size + struct.unpack_from("<I", packed, pos + 4)[0]
    return pos


@pytest.mark.parametrize("damage", ["truncated", "method", "filter", "not_upx", "size", "not_elf"])
def test_anything_but_the_known_packing_is_refused(packed, unpacked, damage):
    data = bytearray(packed)
    first_body = _block_at(packed, 1)
    if damage == "truncated":
        data = data[: first_body + 1000]
    elif damage == "method":
        data[first_body + 8] = 14  # LZMA
    elif damage == "filter":
        data[first_body + 9] = 0x49
    elif damage == "size":
        struct.pack_into("<I", data, first_body, struct.unpack_from("<I", data, first_body)[0] - 1)
    elif damage == "not_upx":
        data = bytearray(unpacked)
    else:
        data = bytearray(b"#!/bin/sh\n" + bytes(100))
    with pytest.raises(ps.PackedBinaryError):
        ps.upx_unpack_elf(bytes(data))


def _anon_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


def test_a_peer_daemon_runs_without_the_relay_service(no_new_p2pd):
    """p2pd's defaults start a relay service that loads an ASN table (≈ 30 MB, ≈ 0.5 CPU-s) in every daemon."""
    network = ps.PeerNetwork(ps.NetworkOptions()).start()
    try:
        with open(f"/proc/{network.p2pd_pid}/cmdline", "rb") as f:
            args = f.read().decode().split("\0")
        config = [a[len("-f="):] for a in args if a.startswith("-f=")]
        assert len(config) == 1 and json.load(open(config[0])) == {"Relay": {"Enabled": False}}
        time.sleep(2)  # the relay service loads its table within half a second of the start
        assert _anon_rss_kb(network.p2pd_pid) < 16_000  # ≈ 5 MB without the relay service, ≈ 34 MB with it
    finally:
        network.shutdown()


def test_the_daemon_config_is_written_once_and_its_absence_only_warns(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MARFL_CACHE_DIR", str(tmp_path / "cache"))
    path = ps.daemon_config_path()
    assert path and open(path, "rb").read() == ps.DAEMON_CONFIG
    stamp = os.stat(path).st_mtime_ns
    assert ps.daemon_config_path() == path and os.stat(path).st_mtime_ns == stamp
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MARFL_CACHE_DIR", str(tmp_path / "file" / "cache"))  # a path that cannot be a folder
    assert ps.daemon_config_path() is None and "relay service" in caplog.text
