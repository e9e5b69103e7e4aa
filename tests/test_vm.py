"""hsd's .deb under systemd as PID 1 on real kernels under QEMU: `pytest -m vm`.

Two guests, each booted once for all its scenarios: trixie (Linux 6.12,
tlshd 1.0.0) and forky (Linux 7.2, tlshd 1.4.0); every test runs per guest.
Why one boot per guest: booting systemd twice (install the .deb, then boot
with it) costs minutes under emulation and every scenario cleans up after
itself, so the backend variants (NAME@openssl, NAME@tlslite, nvme-psk@mixed)
run in the same boot as the rest.  The harness runs as a subprocess
(python3 -m tests.vm), exactly as a developer would run it; a guest that
cannot be built fails the test (exit 2), it is never skipped.  Beyond each scenario's own verdict, these tests read the
scenarios' logs for what the issues ask to be shown: both backends served,
per-mode selection, hsd served from tlshd's own config file, every
handshake line carries all its fields, and the benchmarks' figures (printed,
never asserted: emulation makes times meaningless, only hsd/tlshd ratios count).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GUESTS = ("trixie", "forky")
BACKENDS = ("openssl", "tlslite")
PARITY = ("ktls-matrix", "hsd-nfs", "nvme-psk", "systemd-service")  # each runs once per backend
# systemd-boot reads what the boot did, so it runs first
SCENARIOS = ("systemd-boot", "tlshd-nfs", "tlshd-config", *(f"{name}@{b}" for name in PARITY for b in BACKENDS),
             "nvme-psk@mixed", "nvme-psk@tlshd", "record-limit", "netns-nfs", "nfs-token",
             "bench-nfs", "bench-nvme", "bench-nvme-many")
# the file each guest's ktls-utils ships (1.0.0: /etc/tlshd.conf; 1.4.0: /etc/tlshd/config)
SHIPPED_CONFIG = {"trixie": "/etc/tlshd.conf", "forky": "/etc/tlshd/config"}
HARNESS_TIMEOUT = 3600  # the harness bounds every boot itself; this only guards against a hung host

# core/dispatcher.py Outcome.line(): the one line hsd logs per handshake
HANDSHAKE_LINE = re.compile(
    r"handshake peer=(?P<peer>\S+:\d+) role=(?P<role>client|server) auth=(?P<auth>unauth|x509|psk) "
    r"backend=(?P<backend>\S+) suite=(?P<suite>\S+) group=(?P<group>\S+) duration=(?P<ms>\d+\.\d)ms "
    r"status=(?P<status>\d+) \((?P<status_name>\w+)\)")

pytestmark = pytest.mark.vm


@dataclass
class VmRun:
    guest: str
    rc: int
    output: str
    run_dir: Path | None

    def log(self, scenario: str) -> str:
        assert self.run_dir is not None, f"the harness printed no run directory:\n{self.output[-4000:]}"
        path = self.run_dir / "results" / f"{scenario}.log"
        assert path.exists(), f"{scenario} left no log ({path})"
        return path.read_text(errors="replace")


_RUNS: dict[str, VmRun] = {}
_BUILD: list[subprocess.CompletedProcess[str]] = []


def _build_all_guests(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Both guests' roots and .debs, built side by side once (a cold build is mostly waiting)."""
    if not _BUILD:
        _BUILD.append(subprocess.run([sys.executable, "-m", "tests.vm", "build", "--guest", "all"], cwd=REPO, env=env,
                                     capture_output=True, text=True, timeout=HARNESS_TIMEOUT))
        print(_BUILD[0].stdout + _BUILD[0].stderr)
    return _BUILD[0]


@pytest.fixture(scope="session", params=GUESTS)
def vm_run(request: pytest.FixtureRequest) -> VmRun:
    guest = request.param
    if guest not in _RUNS:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        build = _build_all_guests(env)
        if build.returncode:
            pytest.fail(f"the VM harness cannot build the guests:\n{build.stdout}{build.stderr}")
        proc = subprocess.run([sys.executable, "-m", "tests.vm", "run", "--guest", guest, "--quiet", *SCENARIOS],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=HARNESS_TIMEOUT)
        output = proc.stdout + proc.stderr
        print(output)
        if proc.returncode == 2:
            pytest.fail(f"the VM harness cannot build or start the {guest} guest:\n{output}")
        run_dir = re.search(r"^vm: .*files in (\S+)$", output, re.M)
        _RUNS[guest] = VmRun(guest, proc.returncode, output, Path(run_dir.group(1)) if run_dir else None)
    return _RUNS[guest]


def _verdict(output: str, scenario: str) -> str:
    match = re.search(rf"^vm: {re.escape(scenario)}: (.*)$", output, re.M)
    assert match, f"the harness printed no verdict for {scenario}:\n{output[-4000:]}"
    return match.group(1)


def _require_pass(run: VmRun, scenario: str) -> None:
    """The checks below read a scenario's log: they mean something only when it ran to PASS."""
    verdict = _verdict(run.output, scenario)
    if not verdict.startswith("PASS"):
        detail = ""
        if run.run_dir and (run.run_dir / "results" / f"{scenario}.log").exists():
            detail = "".join(run.log(scenario).splitlines(True)[-60:])
        pytest.fail(f"{scenario}: {verdict}\n{detail}")


def _handshakes(log: str) -> list[re.Match[str]]:
    return [m for line in log.splitlines() if (m := HANDSHAKE_LINE.search(line))]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_passes_on_real_kernel(vm_run: VmRun, scenario: str) -> None:
    _require_pass(vm_run, scenario)


def test_harness_exit_code_matches_verdicts(vm_run: VmRun) -> None:
    all_passed = all(_verdict(vm_run.output, s).startswith("PASS") for s in SCENARIOS)
    assert vm_run.rc == (0 if all_passed else 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ktls_matrix_runs_every_suite_and_role_on_each_backend(vm_run: VmRun, backend: str) -> None:
    scenario = f"ktls-matrix@{backend}"
    _require_pass(vm_run, scenario)
    print("\n".join(line for line in vm_run.log(scenario).splitlines() if " ok: " in line))
    cases = re.findall(rf"ok: (TLS_\S+) hsd-(client|server) \({backend}\): handshake", vm_run.log(scenario))
    assert len(set(cases)) == 8, f"{scenario}: expected 4 suites x 2 roles on {backend}, got {sorted(set(cases))}"


@pytest.mark.parametrize("scenario", [f"{n}@{b}" for n in ("hsd-nfs", "nvme-psk") for b in BACKENDS])
def test_every_handshake_line_has_all_fields_and_the_variants_backend(vm_run: VmRun, scenario: str) -> None:
    _require_pass(vm_run, scenario)
    log = vm_run.log(scenario)
    backend = scenario.split("@")[1]
    print("\n".join(line for line in log.splitlines() if " ok: " in line))
    raw = [line for line in log.splitlines() if "handshake peer=" in line]
    parsed = _handshakes(log)
    assert raw and len(parsed) == len(raw), (
        f"{scenario}: {len(raw) - len(parsed)} of {len(raw)} handshake lines lack a field:\n"
        + "\n".join(line for line in raw if not HANDSHAKE_LINE.search(line))[:2000])
    ok = [m for m in parsed if m["status"] == "0"]
    assert {m["role"] for m in ok} == {"client", "server"}, f"{scenario}: not both roles served"
    for m in parsed:
        assert m["backend"] == backend, f"{scenario}: a handshake ran on {m['backend']}: {m.group(0)}"
    for m in ok:
        assert m["status_name"] == "ok" and m["suite"].startswith("TLS_") and m["group"] != "-", m.group(0)
    if scenario.startswith("nvme-psk"):
        assert {m["auth"] for m in ok} == {"psk"}, f"{scenario}: {sorted({m['auth'] for m in ok})}"
    else:
        # the untrusted-certificate step: a failed handshake line has every field too, and a reason
        failed = [m for m in parsed if m["status"] == "13"]
        assert failed and all(m["status_name"] == "EACCES" for m in failed), f"{scenario}: no EACCES line"


def test_per_mode_override_puts_the_nvme_host_on_tlslite_and_the_target_on_openssl(vm_run: VmRun) -> None:
    _require_pass(vm_run, "nvme-psk@mixed")
    log = vm_run.log("nvme-psk@mixed")
    assert "[hsd.backends] client.psk=tlslite" in log, "hsd check did not show the override"
    ok = [m for m in _handshakes(log) if m["status"] == "0"]
    by_role = {role: {m["backend"] for m in ok if m["role"] == role} for role in ("client", "server")}
    assert by_role == {"client": {"tlslite"}, "server": {"openssl"}}, by_role


def test_hsd_serves_nfs_from_the_file_tlshd_was_given(vm_run: VmRun) -> None:
    """Issue 6: byte for byte the same tlshd config file, no [hsd] section, for both agents."""
    fingerprints = {}
    for scenario in ("tlshd-nfs", *(f"hsd-nfs@{b}" for b in BACKENDS)):
        _require_pass(vm_run, scenario)
        match = re.search(r"AGENT-CONFIG \S+ sha256=([0-9a-f]{64}) path=(\S+)", vm_run.log(scenario))
        assert match, f"{scenario} printed no config fingerprint"
        fingerprints[scenario] = match.groups()
        if scenario != "tlshd-nfs":
            assert "is byte for byte the file tlshd-nfs gave tlshd" in vm_run.log(scenario)
            assert "no warning" in vm_run.log(scenario), f"{scenario}: hsd check was not clean"
    assert len(set(fingerprints.values())) == 1, fingerprints
    shared = vm_run.run_dir / "results" / "tlshd-nfs.conf"
    text = shared.read_text()
    assert "[authenticate.server]" in text and "[hsd" not in text, text


def test_hsd_check_accepts_the_shipped_tlshd_config(vm_run: VmRun) -> None:
    _require_pass(vm_run, "tlshd-config")
    log = vm_run.log("tlshd-config")
    assert f"ok: hsd check -c {SHIPPED_CONFIG[vm_run.guest]}: exit 0, no warning" in log
    assert f"ok: hsd check (no -c) reads {SHIPPED_CONFIG[vm_run.guest]}: exit 0, no warning" in log
    assert not re.search(r"(?i)warning:", log), log  # hsd prints "hsd: warning: ..."; a setting may be named expiry_warning_days


def test_nvme_psk_scenario_passes_with_the_reference_tlshd(vm_run: VmRun) -> None:
    """The scenario itself is right: tlshd, not hsd, served every queue's handshakes."""
    _require_pass(vm_run, "nvme-psk@tlshd")
    log = vm_run.log("nvme-psk@tlshd")
    assert "handshake peer=" not in log and "hsd ready" not in log, "hsd ran in the tlshd variant"
    # tlshd 1.0.0 says "was successful", 1.4.0 "succeeded"
    successes = re.findall(r"tlshd: \S+ tlshd\[\d+\]: Handshake with .* (?:was successful|succeeded)$", log, re.M)
    figures = re.search(r"AGENT-FIGURES agent=tlshd connect_ms=\d+ handshakes=(\d+) ", log)
    assert figures and int(figures.group(1)) == len(successes) >= 2, (figures and figures.group(0), len(successes))
    print(next(line for line in log.splitlines() if "AGENT-FIGURES" in line))


BENCH_LINE = re.compile(r"^\S+ BENCH (?P<what>\S+) (?P<fields>.*)$", re.M)


def _to_ci_log(capsys: pytest.CaptureFixture[str], guest: str, text: str) -> None:
    """Straight to the terminal, captured or not: the CI log shows these figures for every run."""
    with capsys.disabled():
        print(f"\nvm {guest}: {text}", flush=True)


# the agents each benchmark times, in the same boot (bench-nvme-many adds hsd with --workers)
BENCH_AGENTS = {"bench-nfs": ("hsd", "tlshd"), "bench-nvme": ("hsd", "tlshd"),
                "bench-nvme-many": ("hsd", "hsd-workers", "tlshd")}


@pytest.mark.parametrize("scenario", sorted(BENCH_AGENTS))
def test_bench_prints_figures_for_both_agents(vm_run: VmRun, scenario: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Figures only: every cycle worked (the scenario's PASS); the times and ratio are printed."""
    _require_pass(vm_run, scenario)
    match = BENCH_LINE.search(vm_run.log(scenario))
    assert match, f"{scenario} printed no BENCH line"
    fields = dict(pair.split("=", 1) for pair in match["fields"].split())
    for key in ("cycles", "tlshd_mean_ms", "hsd_mean_ms", "ratio_hsd_over_tlshd"):
        assert key in fields, f"{scenario}: no {key} in {match.group(0)}"
    cycles = int(fields["cycles"])
    counted = re.findall(r" (hsd|hsd-workers|tlshd) cycle (\d+): \d+ ms", vm_run.log(scenario))
    agents = BENCH_AGENTS[scenario]
    assert sorted(counted) == sorted((a, str(i)) for a in agents for i in range(1, cycles + 1)), counted
    _to_ci_log(capsys, vm_run.guest, match.group(0).split(" BENCH ", 1)[1])


GUEST_KERNEL = {"trixie": ("6.12.", "1.0.0"), "forky": ("7.2.", "1.4.0")}


def test_guest_runs_its_suites_kernel_and_tlshd_under_systemd(vm_run: VmRun,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The guest is what it claims: its suite's kernel and ktls-utils, systemd as PID 1, the .deb installed."""
    series, tlshd = GUEST_KERNEL[vm_run.guest]
    ready = re.search(rf"^vm: guest {vm_run.guest} ready .* kernel (\S+); (hsd_\S+\.deb) of .* ktls-utils=(\S+)",
                      vm_run.output, re.M)
    assert ready, vm_run.output[-3000:]
    assert ready.group(1).startswith(series) and ready.group(3).startswith(tlshd), ready.group(0)
    console = (vm_run.run_dir / "console.log").read_text(errors="replace")
    assert re.search(rf"HSD-VM-BOOTED {re.escape(series)}\S* systemd \d+ phase=install", console), console[-3000:]
    assert re.search(rf"HSD-VM-BOOTED {re.escape(series)}\S* systemd \d+ phase=run", console), console[-3000:]
    install = (vm_run.run_dir / "results" / "install.log").read_text()
    assert "apt rc=0" in install and "is-active: active" in install, install
    timing = re.search(rf"^vm: {vm_run.guest} \(accel \w+\): .*$", vm_run.output, re.M)
    assert timing, vm_run.output[-3000:]
    builds = re.findall(rf"^vm: build {vm_run.guest} .*$|^vm: build of .*$", vm_run.output, re.M) or \
        re.findall(r"^vm: build .*$", "\n".join(r.stdout for r in _BUILD), re.M)
    scenarios = " ".join(f"{s}={m.group(1)}" for s in SCENARIOS
                         if (m := re.search(rf"^vm: {re.escape(s)}: PASS in (\S+) s$", vm_run.output, re.M)))
    _to_ci_log(capsys, vm_run.guest, "\n".join([*builds, ready.group(0).split(";")[0], timing.group(0),
                                                f"scenario seconds: {scenarios}"]))


def test_systemd_boot_starts_hsd_before_the_fstab_tls_mount(vm_run: VmRun) -> None:
    _require_pass(vm_run, "systemd-boot")
    log = vm_run.log("systemd-boot")
    for needed in ("ok: hsd.service active from /usr/lib/systemd/system/hsd.service (package hsd",
                   "ms to READY)", "<= remote-fs-pre.target", "active (systemd, at boot): xprtsec=tls",
                   "identifier hsd, pid", "priority 6"):
        assert needed in log, f"{vm_run.guest}: systemd-boot did not show '{needed}'"
    print("\n".join(line for line in log.splitlines() if " ok: " in line))


def test_systemd_analyze_security_rates_hsd_ok_next_to_tlshd(vm_run: VmRun,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    _require_pass(vm_run, "systemd-boot")
    match = re.search(r"SECURITY guest=(\S+) systemd=(\S+) hsd.service=(\S+)_(\S+) tlshd.service=(\S+)_(\S+)",
                      vm_run.log("systemd-boot"))
    assert match, "systemd-boot printed no SECURITY line"
    assert float(match.group(3)) <= 1.6 and match.group(4) == "OK", match.group(0)
    _to_ci_log(capsys, vm_run.guest, match.group(0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_systemd_reload_kill_and_stop_on_each_backend(vm_run: VmRun, backend: str) -> None:
    scenario = f"systemd-service@{backend}"
    _require_pass(vm_run, scenario)
    log = vm_run.log(scenario)
    print("\n".join(line for line in log.splitlines() if " ok: " in line))
    assert re.search(r"ok: after reload with an untrusted certificate: mount fails .*status=13 \(EACCES\).*, priority 4$",
                     log, re.M), f"{scenario}: the reload did not take effect"
    assert re.search(r"ok: killed \d+, systemd restarted it as \d+", log), f"{scenario}: no restart after SIGKILL"
    # an NVMe connect and two NFS mounts towards silent peers, in flight when hsd was stopped
    stopped = re.findall(r"ok: in flight at stop, (\S+): .*status=(\d+) ", log)
    assert sorted(peer for peer, _ in stopped) == ["127.0.0.1:4431", "127.0.0.2:20049", "127.0.0.3:20049"], stopped
    assert all(status != "0" for _, status in stopped), stopped
    assert re.search(r"ok: systemctl stop took \d+ ms: hsd \d+ exited 0", log)
    assert re.search(rf"handshake peer=\S+ role=client auth=\w+ backend={backend} ", log) or \
        f"handshakes on backend={backend}" in log, f"{scenario}: no handshake on {backend}"


def test_each_network_namespace_is_served_by_its_own_hsd(vm_run: VmRun) -> None:
    """hsd@tenant1 (the package's template) serves the NFS client inside netns tenant1, hsd.service
    the root namespace: nfsd's side of that mount and both sides of a root-namespace mount."""
    _require_pass(vm_run, "netns-nfs")
    log = vm_run.log("netns-nfs")
    print("\n".join(line for line in log.splitlines() if " ok: " in line))
    assert re.search(r"ok: hsd: /usr/lib/systemd/system/hsd@\.service; is-enabled: (?!enabled$)\S+$", log, re.M), \
        "the template is not the package's, or the install enabled it"
    assert re.search(r"ok: mount in tenant1 failed \(exit \d+\) .*; hsd\.service logged no handshake towards 10\.99\.0\.1$",
                     log, re.M), "a mount in tenant1 worked, or hsd.service served it, with no agent in tenant1"
    assert re.search(r"ok: hsd@tenant1 \d+ runs in netns tenant1, hsd\.service \d+ in the root namespace$", log, re.M)
    assert re.search(r"ok: in tenant1: kTLS sockets TlsCurrTxSw=[1-9]", log), "no kTLS socket inside tenant1"
    served = re.search(r"ok: hsd@tenant1: (\d+) client handshake\(s\) towards 10\.99\.0\.1:2049 and nothing else: "
                       r"peer=10\.99\.0\.1:2049 role=client .* status=0 \(ok\)$", log, re.M)
    assert served and int(served.group(1)) >= 1, "hsd@tenant1 did not serve (only) tenant1's client handshake"
    assert re.search(r"ok: hsd\.service, server side of tenant1's mount: peer=10\.99\.0\.2:\d+ role=server .* "
                     r"status=0 \(ok\)$", log, re.M), "hsd.service did not serve nfsd's side of tenant1's mount"
    for role in ("client", "server"):
        assert re.search(rf"ok: hsd\.service, root namespace's mount, {role}: peer=127\.0\.0\.1:\d+ role={role} .* "
                         r"status=0 \(ok\)$", log, re.M), f"hsd.service did not serve the root mount's {role} side"
    assert re.search(r"ok: hsd status --socket /run/hsd-netns/tenant1/control: pid \d+, config /etc/hsd/tenant1\.conf, "
                     rf"served {served.group(1)}, failed 0$", log, re.M)
    assert "ok: hsd.service stopped: hsd@tenant1.service still active, /run/hsd-netns/tenant1/control still answers" in log
    assert "ok: hsd@tenant1.service stopped (Result=success), its control socket removed" in log


def test_an_nfs_mtls_mount_signs_with_a_key_that_never_leaves_a_token(vm_run: VmRun) -> None:
    """hsd.service (the .deb, on the system OpenSSL with pkcs11-provider) serves an xprtsec=mtls mount
    whose client key was generated in a SoftHSM2 token: the URIs in the credentials line with the PIN
    masked, nfsd's side saw a verified client certificate, and the token refuses to hand the key out."""
    _require_pass(vm_run, "nfs-token")
    log = vm_run.log("nfs-token")
    print("\n".join(line for line in log.splitlines() if " ok: " in line or " INFO " in line))
    uri = "pkcs11:token=hsd-vm;object=nfs-client"
    assert re.search(r"ok: hsd check: OK, .*x509\.private_key: a key in a token \(" + re.escape(uri)
                     + r";type=private\?pin-value=\*\*\*\)", log), "hsd check did not load the token key"
    assert re.search(r"ok: hsd\.service active, pid \d+, ProtectSystem=strict, ReadWritePaths=/var/lib/softhsm/tokens$",
                     log, re.M), "hsd.service does not run sandboxed with the drop-in"
    assert re.search(r"ok: mounted in \d+ ms: localhost:/ nfs4 ", log) and "ok: 1 MiB written and read back identical" in log
    assert re.search(r"ok: xprtsec=tls mount refused \(exit [1-9]\d*\)", log), "the export took a mount with no client certificate"
    assert f"ok: credentials: certificate {uri};type=cert (1 in chain), private key {uri};type=private?pin-value=***," in log
    assert "731946" not in log, "the PIN reached the scenario's log"
    assert re.search(r"ok: client side, key in the token: peer=127\.0\.0\.1:2049 role=client auth=x509 backend=openssl "
                     r".* status=0 \(ok\)$", log, re.M), "no successful client x509 handshake with the token key"
    assert re.search(r"ok: server side: remote-auth 4294967295(,4294967295)* ", log), "nfsd's side saw no verified client certificate"
    assert re.search(r"ok: private key object: Access: .*sensitive.*never extractable", log), "the key is extractable"
    assert re.search(r"ok: pkcs11-tool --read-object --type privkey: exit \d+, \d+ bytes written, none of them a private key",
                     log), "the private key was read out"


# what the kernel says on hsd's kTLS sockets: 6.12 has no TLS_TX_MAX_PAYLOAD_LEN, 7.2 has it and
# must report full-size records (OpenSSL peers announce no record_size_limit)
TX_MAX_PAYLOAD = {"trixie": "absent (ENOPROTOOPT)", "forky": "16384"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_ktls_record_size_option_matches_the_kernel(vm_run: VmRun, backend: str) -> None:
    scenario = f"ktls-matrix@{backend}"
    _require_pass(vm_run, scenario)
    match = re.search(r"TLS_TX_MAX_PAYLOAD_LEN on hsd's kTLS sockets: (.*)$", vm_run.log(scenario), re.M)
    assert match, f"{scenario} printed no TLS_TX_MAX_PAYLOAD_LEN line"
    assert match.group(1) == TX_MAX_PAYLOAD[vm_run.guest], match.group(0)
    print(match.group(0))


# record-limit: GnuTLS --recordsize 512 announces 513; what the guest's kernel can do with it
RECORD_LIMIT_OPTION = {"trixie": "absent (ENOPROTOOPT)", "forky": "512"}


def test_record_size_limit_caps_the_kernels_records_where_it_can(vm_run: VmRun) -> None:
    scenario = "record-limit"
    _require_pass(vm_run, scenario)
    log = vm_run.log(scenario)
    print("\n".join(line for line in log.splitlines() if re.search(r"(client|server): |hsd warning: ", line)))
    for role in ("client", "server"):
        option = re.escape(RECORD_LIMIT_OPTION[vm_run.guest])
        assert re.search(rf"(?<![\w-]){role}: handshake \d+ ms, peer's record_size_limit 513, "
                         rf"TLS_TX_MAX_PAYLOAD_LEN after install: {option}$", log, re.M), f"{role}: no handshake line"
        largest = re.search(rf"(?<![\w-]){role}: hsd's side sent (\d+) protected records, .* largest (\d+)$", log, re.M)
        assert largest, f"{role}: the relay's count is missing"
        if vm_run.guest == "forky":
            assert int(largest.group(2)) == 513 and int(largest.group(1)) >= 128, largest.group(0)
            assert re.search(rf"(?<![\w-]){role}: \d+ bytes written, peer \w+ \d+ \(identical\)$", log, re.M)
        else:
            assert int(largest.group(2)) > 513, largest.group(0)  # 6.12: full-size records
    warnings = re.findall(r"hsd warning: .*TLS_TX_MAX_PAYLOAD_LEN.*$", log, re.M)
    assert len(warnings) == (1 if vm_run.guest == "trixie" else 0), warnings
