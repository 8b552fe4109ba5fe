"""Scenario loading and validation: every error names the file and the right line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from vmlab.scenario import (
    DGRAM_ERROR,
    VMADDR_CID_ANY,
    VMADDR_CID_HOST,
    VMADDR_PORT_ANY,
    GuestConnectStep,
    HostListenStep,
    Problem,
    RunStep,
    Scenario,
    ScenarioError,
    SleepStep,
    Step,
    VmSpec,
    inline_scenario,
    load_scenario,
    parse_scenario,
    validate,
)

REPO = Path(__file__).resolve().parents[2]
MARK = "#<"  # put this comment on the line an error must point at

VMS = """\
vms:
  - name: a
    cid: 3
  - name: b
    cid: 4
"""


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def marked_line(path: Path) -> int:
    lines = [i for i, line in enumerate(path.read_text().splitlines(), 1) if MARK in line]
    assert len(lines) == 1, "test YAML needs exactly one marker"
    return lines[0]


def errors(path: Path) -> list[Problem]:
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert info.value.problems, "ScenarioError without problems"
    return info.value.problems


def expect_error(tmp_path: Path, text: str, fragment: str) -> Problem:
    """Load `text`, demand a problem containing `fragment` on the marked line of this file."""
    path = write(tmp_path, text)
    problems = errors(path)
    hits = [p for p in problems if fragment in p.message]
    assert hits, f"no problem containing {fragment!r} in:\n" + "\n".join(map(str, problems))
    assert hits[0].file == str(path)
    assert hits[0].line == marked_line(path), str(hits[0])
    assert hits[0].column >= 1
    assert str(hits[0]).startswith(f"{path}:{hits[0].line}:{hits[0].column}: ")
    return hits[0]


def load_ok(tmp_path: Path, text: str) -> Scenario:
    return load_scenario(write(tmp_path, text))


# ---- examples ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["hello", "boot"])
def test_examples_load_cleanly(name: str) -> None:
    s = load_scenario(REPO / "scenarios" / f"{name}.yaml")
    assert s.name == name
    assert s.warnings == []
    assert s.source == REPO / "scenarios" / f"{name}.yaml"


def test_hello_matches_the_seed_notes() -> None:
    s = load_scenario(REPO / "scenarios" / "hello.yaml")
    assert [(v.name, v.cid) for v in s.vms] == [("guest", 3)]
    listen, connect, expect = (step.params for step in s.steps)
    assert isinstance(listen, HostListenStep)
    assert (listen.id, listen.port, listen.cid, listen.chunk, listen.type) == ("srv", 9999, VMADDR_CID_HOST, 64, "stream")
    assert isinstance(connect, GuestConnectStep)
    assert (connect.vm, connect.cid, connect.port, connect.send) == ("guest", VMADDR_CID_HOST, 9999, "Hello, world!")
    assert (expect.id, expect.message) == ("srv", "Hello, world!")


def test_boot_example_has_two_pinned_vms_running_commands() -> None:
    s = load_scenario(REPO / "scenarios" / "boot.yaml")
    assert [(v.name, v.cid) for v in s.vms] == [("a", 3), ("b", 4)]
    assert {st.params.vm for st in s.steps} == {"a", "b"}
    assert all(st.action == "run" for st in s.steps)


# ---- defaults and conversions ----------------------------------------------------------------

def test_defaults_and_conversions(tmp_path: Path) -> None:
    (tmp_path / "vmlinuz").write_text("k")
    (tmp_path / "repro").write_text("r")
    (tmp_path / "shared").mkdir()
    s = load_ok(tmp_path, """\
        transport: vhost-user
        defaults: {memory: 1G, cpus: 2, kernel: vmlinuz}
        vms:
          - name: a
            memory: 512
            files: {/root/repro: ./repro}
            share: shared
            qemu_args: "-smp 2 -name 'x y'"
          - name: b
            transport: auto
            vsock: false
        steps:
          - host_listen: {id: s, port: any, cid: -1}
          - sleep: 0.5
    """)
    a, b = s.vms
    assert s.name == "s" and s.timeout == 300 and s.transport == "vhost-user"
    assert (a.memory_mib, a.cpus, a.cid, a.transport, a.vsock) == (512, 2, None, "vhost-user", True)
    assert (b.memory_mib, b.transport, b.vsock) == (1024, "auto", False)
    assert a.kernel == tmp_path / "vmlinuz" and a.kernel.is_absolute()
    assert a.files == {"/root/repro": tmp_path / "repro"}
    assert a.share == tmp_path / "shared"
    assert a.qemu_args == ["-smp", "2", "-name", "x y"]
    listen = s.steps[0].params
    assert (listen.port, listen.cid) == (VMADDR_PORT_ANY, VMADDR_CID_ANY)
    assert isinstance(s.steps[1].params, SleepStep) and s.steps[1].params.seconds == 0.5
    assert s.steps[0].timeout == 30 and s.steps[0].background is False
    assert s.vm("b") is b


def test_vsock_forms_accepted(tmp_path: Path) -> None:
    s = load_ok(tmp_path, """\
        vms:
          - {name: a, vsock: {}}
          - {name: b, vsock: [{}]}
          - {name: c, vsock: false}
          - {name: d}
    """)
    assert [v.vsock for v in s.vms] == [True, True, False, True]


def test_anchors_and_merge_keys(tmp_path: Path) -> None:
    s = load_ok(tmp_path, """\
        vms:
          - &base {name: z, memory: 128M, cpus: 2}
          - {<<: *base, name: a}
    """)
    assert [(v.name, v.memory_mib, v.cpus) for v in s.vms] == [("z", 128, 2), ("a", 128, 2)]


def test_guest_connect_to_vm_name_resolves_at_run_time(tmp_path: Path) -> None:
    s = load_ok(tmp_path, """\
        transport: vhost-user
        vms: [{name: a}, {name: b}]
        steps:
          - guest_listen: {id: l, vm: b, port: 1234}
          - guest_connect: {id: c, vm: a, cid: b, port: 1234, send_bytes: 4096}
          - expect: {id: l, bytes: 4096, sha256: pattern}
          - wait_for: {id: c, event: closed}
    """)
    assert s.steps[1].params.cid == "b"
    assert s.steps[1].id == "c"


def test_privileged_port_is_a_warning(tmp_path: Path) -> None:
    path = write(tmp_path, VMS + f"steps:\n  - host_listen: {{id: s, port: 80}}  {MARK}\n")
    s = load_scenario(path)
    assert len(s.warnings) == 1
    w = s.warnings[0]
    assert (w.file, w.line) == (str(path), marked_line(path))
    assert "privileged" in w.message and "CAP_NET_BIND_SERVICE" in w.message


# ---- whole-file problems -----------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "# nothing here\n", "---\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    (p,) = errors(write(tmp_path, text))
    assert (p.line, p.column) == (1, 1) and "empty scenario" in p.message


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    expect_error(tmp_path, f"- name: a  {MARK}\n", "top level must be a mapping")


def test_yaml_syntax_error_has_yamls_line(tmp_path: Path) -> None:
    p = expect_error(tmp_path, f"""\
        vms:
          - name: a
            cid: 3: 4  {MARK}
    """, "YAML syntax error")
    assert "mapping values are not allowed here" in p.message
    assert len(errors(write(tmp_path, "vms: [\n"))) == 1


def test_two_documents_are_refused(tmp_path: Path) -> None:
    expect_error(tmp_path, f"vms: [{{name: a}}]\n---  {MARK}\nvms: []\n", "single document")


def test_missing_file_is_a_scenario_error(tmp_path: Path) -> None:
    (p,) = errors(tmp_path / "nope.yaml")
    assert "cannot read scenario" in p.message and p.file == str(tmp_path / "nope.yaml")


def test_unsafe_tags_are_not_constructed(tmp_path: Path) -> None:
    expect_error(tmp_path, f"name: !!python/object/apply:os.system ['true']  {MARK}\n" + VMS,
                 "unsupported YAML tag")
    expect_error(tmp_path, f"name: !!python/name:os.system ''  {MARK}\n" + VMS, "cannot read value")


def test_duplicate_key(tmp_path: Path) -> None:
    expect_error(tmp_path, f"""\
        vms:
          - name: a
            cid: 3
            cid: 5  {MARK}
    """, "duplicate key 'cid' (first defined at line 3)")


def test_unknown_top_level_key_suggests(tmp_path: Path) -> None:
    p = expect_error(tmp_path, f"timout: 10  {MARK}\n" + VMS, "unknown key 'timout'")
    assert "did you mean 'timeout'?" in p.message


def test_unknown_vm_key_suggests(tmp_path: Path) -> None:
    p = expect_error(tmp_path, f"""\
        vms:
          - name: a
            memroy: 1G  {MARK}
    """, "unknown key 'memroy'")
    assert "did you mean 'memory'?" in p.message


def test_unknown_step_field_suggests(tmp_path: Path) -> None:
    p = expect_error(tmp_path, VMS + f"""\
steps:
  - run: {{vm: a, comand: true}}  {MARK}
""", "unknown key 'comand'")
    assert "did you mean 'command'?" in p.message


def test_missing_vms(tmp_path: Path) -> None:
    expect_error(tmp_path, f"name: x  {MARK}\n", "'vms' is required")


def test_empty_vms(tmp_path: Path) -> None:
    expect_error(tmp_path, f"vms: []  {MARK}\n", "at least one VM is required")


def test_wrong_type_names_expected_type(tmp_path: Path) -> None:
    p = expect_error(tmp_path, f"""\
        vms:
          - name: a
            cpus: two  {MARK}
    """, "cpus: expected an integer")
    assert "got string 'two'" in p.message


def test_bool_is_not_an_int(tmp_path: Path) -> None:
    expect_error(tmp_path, VMS + f"""\
steps:
  - host_listen: {{id: s, port: true}}  {MARK}
""", "port: expected an integer 0..4294967294 or 'any', got true (a boolean)")


def test_scenario_timeout_must_be_positive(tmp_path: Path) -> None:
    expect_error(tmp_path, f"timeout: 0  {MARK}\n" + VMS, "timeout: 0 is out of range")


def test_transport_unknown_suggests(tmp_path: Path) -> None:
    p = expect_error(tmp_path, f"transport: vhost_user  {MARK}\n" + VMS, "unknown transport 'vhost_user'")
    assert "did you mean 'vhost-user'?" in p.message


def test_multiple_problems_reported_together(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        vms:
          - name: a
            cid: 1
          - name: A
        steps:
          - host_listen: {id: s, port: 5, type: dgram}
          - expect: {id: nope, message: x}
    """)
    problems = errors(path)
    assert [p.line for p in problems] == [3, 4, 6, 7]
    text = str(ScenarioError(problems))
    assert text.count("\n") == 3 and all(line.startswith(f"{path}:") for line in text.splitlines())


# ---- VMs -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cid,fragment", [
    ("0", "VMADDR_CID_HYPERVISOR"),
    ("1", "VMADDR_CID_RESERVED"),
    ("2", "VMADDR_CID_HOST"),
    ("-1", "VMADDR_CID_ANY"),
    ("0xFFFFFFFF", "VMADDR_CID_ANY"),
    ("0x100000000", "does not fit in 32 bits"),
    ("-5", "negative"),
    ("'3'", "expected an integer CID"),
])
def test_bad_vm_cid(tmp_path: Path, cid: str, fragment: str) -> None:
    expect_error(tmp_path, f"""\
        vms:
          - name: a
            cid: {cid}  {MARK}
    """, fragment)


def test_largest_cid_is_fine(tmp_path: Path) -> None:
    assert load_ok(tmp_path, "vms: [{name: a, cid: 0xFFFFFFFE}]\n").vms[0].cid == 0xFFFFFFFE


def test_duplicate_cid(tmp_path: Path) -> None:
    expect_error(tmp_path, f"""\
        vms:
          - {{name: a, cid: 7}}
          - {{name: b, cid: 7}}  {MARK}
    """, "CID 7 is already used by VM 'a'")


def test_duplicate_vm_name(tmp_path: Path) -> None:
    expect_error(tmp_path, f"""\
        vms:
          - name: a
          - name: a  {MARK}
    """, "duplicate VM name 'a'")


@pytest.mark.parametrize("name,fragment", [
    ("Big", "not a valid VM name"),
    ("-a", "not a valid VM name"),
    ("a" * 33, "not a valid VM name"),
    ("host", "reserved"),
])
def test_bad_vm_name(tmp_path: Path, name: str, fragment: str) -> None:
    expect_error(tmp_path, f"vms:\n  - name: {name}  {MARK}\n", fragment)


def test_vm_name_required(tmp_path: Path) -> None:
    expect_error(tmp_path, f"vms:\n  - cid: 3  {MARK}\n", "'name' is required")


@pytest.mark.parametrize("memory,fragment", [
    ("32M", "too small; the minimum is 64M"),
    ("63", "too small"),
    ("lots", "expected MiB as an integer or a size like '256M'"),
    ("1.5G", "expected MiB"),
])
def test_bad_memory(tmp_path: Path, memory: str, fragment: str) -> None:
    expect_error(tmp_path, f"vms:\n  - name: a\n    memory: {memory}  {MARK}\n", fragment)


def test_bad_memory_in_defaults_is_reported_once_at_defaults(tmp_path: Path) -> None:
    p = expect_error(tmp_path, f"defaults: {{memory: 16M}}  {MARK}\n" + VMS, "too small")
    assert p.message.startswith("defaults: ")
    assert len([q for q in errors(tmp_path / "s.yaml") if "too small" in q.message]) == 1


def test_bad_cpus_in_defaults_is_reported_once(tmp_path: Path) -> None:
    p = expect_error(tmp_path, f"defaults: {{cpus: 0}}  {MARK}\n" + VMS, "cpus: 0 is out of range")
    assert p.message.startswith("defaults: ")
    assert len(errors(tmp_path / "s.yaml")) == 1


def test_invalid_vm_name_does_not_cascade_into_unknown_vm(tmp_path: Path) -> None:
    path = write(tmp_path, "vms: [{name: Big}]\nsteps:\n  - run: {vm: Big, command: 'true'}\n")
    assert [p.line for p in errors(path)] == [1]


def test_missing_kernel(tmp_path: Path) -> None:
    p = expect_error(tmp_path, f"vms:\n  - name: a\n    kernel: boot/vmlinuz  {MARK}\n", "does not exist")
    assert str(tmp_path / "boot" / "vmlinuz") in p.message


def test_missing_file_for_files(tmp_path: Path) -> None:
    expect_error(tmp_path, f"vms:\n  - name: a\n    files: {{/root/x: ./x}}  {MARK}\n", "does not exist")


def test_guest_path_in_files_must_be_absolute(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("")
    expect_error(tmp_path, f"vms:\n  - name: a\n    files: {{root/x: ./x}}  {MARK}\n", "must be an absolute")


def test_share_must_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    expect_error(tmp_path, f"vms:\n  - name: a\n    share: f  {MARK}\n", "is not a directory")


def test_two_vsock_devices(tmp_path: Path) -> None:
    expect_error(tmp_path, f"""\
        vms:
          - name: a
            vsock:
              - {{}}
              - {{}}  {MARK}
    """, "only one vsock device per VM is supported")


def test_empty_vsock_list(tmp_path: Path) -> None:
    expect_error(tmp_path, f"vms:\n  - name: a\n    vsock: []  {MARK}\n", "vsock: false")


def test_vsock_options_are_unknown_keys(tmp_path: Path) -> None:
    expect_error(tmp_path, f"vms:\n  - name: a\n    vsock: {{cid: 3}}  {MARK}\n", "unknown key 'cid'")


@pytest.mark.parametrize("device", ["vhost-vsock-pci,guest-cid=5", "vhost-user-vsock-pci,chardev=c",
                                    '{"driver":"vhost-vsock-device"}'])
def test_vsock_device_in_qemu_args(tmp_path: Path, device: str) -> None:
    expect_error(tmp_path, f"""\
        vms:
          - name: a
            qemu_args:
              - -device
              - '{device}'  {MARK}
    """, "only one vsock device per VM is supported and vmlab adds it")


def test_cid_without_vsock_is_a_warning(tmp_path: Path) -> None:
    s = load_ok(tmp_path, "vms: [{name: a, cid: 3, vsock: false}]\n")
    assert ["no vsock device" in w.message for w in s.warnings] == [True]


def test_vsock_step_on_vm_without_vsock(tmp_path: Path) -> None:
    expect_error(tmp_path, f"""\
        vms: [{{name: a, vsock: false}}]
        steps:
          - guest_listen: {{id: l, vm: a, port: 5}}  {MARK}
    """, "VM 'a' has no vsock device")


# ---- steps: shape ---------------------------------------------------------------------------------

def steps(body: str) -> str:
    return VMS + "steps:\n" + textwrap.dedent(body)


def test_step_without_action(tmp_path: Path) -> None:
    expect_error(tmp_path, steps(f"  - name: nothing  {MARK}\n"), "no action")


def test_step_with_two_actions(tmp_path: Path) -> None:
    expect_error(tmp_path, steps(f"  - run: {{vm: a, command: true}}\n    sleep: 1  {MARK}\n"),
                 "exactly one action, found run and sleep")


def test_unknown_action_suggests(tmp_path: Path) -> None:
    p = expect_error(tmp_path, steps(f"  - host_lisen: {{id: s, port: 5}}  {MARK}\n"), "unknown key 'host_lisen'")
    assert "did you mean 'host_listen'?" in p.message


def test_step_must_be_a_mapping(tmp_path: Path) -> None:
    expect_error(tmp_path, steps(f"  - sleep  {MARK}\n"), "a step is a mapping")


def test_sleep_takes_a_number(tmp_path: Path) -> None:
    expect_error(tmp_path, steps(f"  - sleep: {{seconds: 1}}  {MARK}\n"), "sleep takes a number of seconds")


def test_sleep_negative(tmp_path: Path) -> None:
    expect_error(tmp_path, steps(f"  - sleep: -1  {MARK}\n"), "seconds: -1 is out of range")


def test_step_timeout_positive(tmp_path: Path) -> None:
    expect_error(tmp_path, steps(f"  - sleep: 1\n    timeout: -3  {MARK}\n"), "timeout: -3 is out of range")


def test_background_not_for_sleep(tmp_path: Path) -> None:
    expect_error(tmp_path, steps(f"  - sleep: 1\n    background: true  {MARK}\n"), "cannot run in the background")


def test_missing_required_field_points_at_action(tmp_path: Path) -> None:
    expect_error(tmp_path, steps(f"  - run: {{vm: a}}  {MARK}\n"), "'command' is required")


def test_unknown_vm_reference_suggests(tmp_path: Path) -> None:
    p = expect_error(tmp_path, VMS.replace("name: b", "name: bravo") + f"""\
steps:
  - run: {{vm: brav, command: true}}  {MARK}
""", "unknown VM 'brav'")
    assert "did you mean 'bravo'?" in p.message


def test_bad_regex(tmp_path: Path) -> None:
    expect_error(tmp_path, steps(f"  - run: {{vm: a, command: x, expect_regex: '(unclosed'}}  {MARK}\n"),
                 "invalid regular expression")


# ---- steps: sockets ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["dgram", "datagram", "SOCK_DGRAM"])
def test_dgram_is_refused_with_the_exact_text(tmp_path: Path, kind: str) -> None:
    p = expect_error(tmp_path, steps(f"  - host_listen: {{id: s, port: 5, type: {kind}}}  {MARK}\n"),
                     "SOCK_DGRAM is not supported")
    assert p.message.endswith(DGRAM_ERROR)
    assert DGRAM_ERROR == ("SOCK_DGRAM is not supported: virtio-vsock has no datagram sockets in "
                           "stock kernels; use stream or seqpacket")


def test_unknown_socket_type(tmp_path: Path) -> None:
    expect_error(tmp_path, steps(f"  - host_listen: {{id: s, port: 5, type: raw}}  {MARK}\n"),
                 "unknown socket type 'raw'")


def test_seqpacket_accepted(tmp_path: Path) -> None:
    s = load_ok(tmp_path, steps("  - guest_listen: {id: s, vm: a, port: 5, type: SOCK_SEQPACKET}\n"))
    assert s.steps[0].params.type == "seqpacket"


@pytest.mark.parametrize("port,fragment", [
    ("any", "VMADDR_PORT_ANY (-1) only makes sense for listeners"),
    ("-1", "VMADDR_PORT_ANY (-1) only makes sense for listeners"),
    ("0xFFFFFFFF", "VMADDR_PORT_ANY (-1) only makes sense for listeners"),
    ("0x100000000", "does not fit in 32 bits"),
    ("-2", "negative"),
    ("'80'", "expected an integer 0..4294967294,"),
])
def test_bad_connect_port(tmp_path: Path, port: str, fragment: str) -> None:
    expect_error(tmp_path, steps(f"  - host_connect: {{id: c, vm: a, port: {port}}}  {MARK}\n"), fragment)


def test_expect_exit_any(tmp_path: Path) -> None:
    s = load_ok(tmp_path, steps("  - run: {vm: a, command: 'false', expect_exit: any}\n"))
    assert s.steps[0].params.expect_exit is None


def test_host_listen_on_cid_any_warns(tmp_path: Path) -> None:
    s = load_ok(tmp_path, steps("  - host_listen: {id: s, port: 5000, cid: any}\n"))
    assert len(s.warnings) == 1 and "cid: host (2) is the portable choice" in s.warnings[0].message


def test_listener_port_any_forms(tmp_path: Path) -> None:
    s = load_ok(tmp_path, steps("""\
        - host_listen: {id: x, port: -1}
        - host_listen: {id: y, port: 0xFFFFFFFF}
        - guest_listen: {id: z, vm: a, port: any, cid: -1}
        - host_listen: {id: w, port: 0xFFFFFFFE}
    """))
    assert [st.params.port for st in s.steps] == [VMADDR_PORT_ANY] * 3 + [0xFFFFFFFE]


def test_host_listen_cid_must_be_host_or_any(tmp_path: Path) -> None:
    expect_error(tmp_path, steps(f"  - host_listen: {{id: s, port: 5, cid: 3}}  {MARK}\n"),
                 "binds host (2) or any (-1)")


def test_guest_listen_must_bind_its_own_cid(tmp_path: Path) -> None:
    expect_error(tmp_path, steps(f"  - guest_listen: {{id: s, vm: a, port: 5, cid: 4}}  {MARK}\n"),
                 "VM 'a' has CID 3")


@pytest.mark.parametrize("cid,fragment", [
    ("0", "CID 0 (VMADDR_CID_HYPERVISOR)"),
    ("1", "CID 1 (VMADDR_CID_RESERVED)"),
    ("any", "VMADDR_CID_ANY"),
    ("0x100000000", "does not fit in 32 bits"),
    ("charlie", "neither host, a CID nor a VM name"),
])
def test_bad_connect_cid(tmp_path: Path, cid: str, fragment: str) -> None:
    expect_error(tmp_path, steps(f"  - guest_connect: {{id: c, vm: a, cid: {cid}, port: 5}}  {MARK}\n"),
                 fragment)


def test_vm_to_vm_over_vhost_is_refused(tmp_path: Path) -> None:
    expect_error(tmp_path, "transport: vhost\n" + steps(
        f"  - guest_connect: {{id: c, vm: a, cid: b, port: 5}}  {MARK}\n"), "does not work over the vhost")


def test_vm_to_vm_over_vhost_allowed_when_expecting_failure(tmp_path: Path) -> None:
    s = load_ok(tmp_path, "transport: vhost\n" + steps(
        "  - guest_connect: {id: c, vm: a, cid: 4, port: 5, expect_error: ETIMEDOUT}\n"))
    assert s.steps[0].params.expect_error == "ETIMEDOUT"


def test_vm_to_vm_in_other_group_is_refused(tmp_path: Path) -> None:
    expect_error(tmp_path, f"""\
        transport: vhost-user
        vms:
          - {{name: a, group: g1}}
          - {{name: b, group: g2}}
        steps:
          - guest_connect: {{id: c, vm: a, cid: b, port: 5}}  {MARK}
    """, "the backend routes only within a group")


def test_send_variants_are_exclusive(tmp_path: Path) -> None:
    expect_error(tmp_path, steps(f"""\
        - host_connect:
            id: c
            vm: a
            port: 5
            send: hi
            send_bytes: 10  {MARK}
    """), "send, send_bytes and send_file are mutually exclusive")


def test_host_send_file_must_exist(tmp_path: Path) -> None:
    expect_error(tmp_path, steps(f"  - host_connect: {{id: c, vm: a, port: 5, send_file: data.bin}}  {MARK}\n"),
                 "does not exist")


def test_host_send_file_resolved_absolute(tmp_path: Path) -> None:
    (tmp_path / "data.bin").write_bytes(b"x")
    s = load_ok(tmp_path, steps("  - host_connect: {id: c, vm: a, port: 5, send_file: data.bin}\n"))
    assert s.steps[0].params.send_file == tmp_path / "data.bin"


def test_guest_send_file_must_be_absolute(tmp_path: Path) -> None:
    expect_error(tmp_path, steps(f"  - guest_connect: {{id: c, vm: a, cid: host, port: 5, send_file: x}}  {MARK}\n"),
                 "guest path and must be absolute")


def test_unknown_errno_suggests(tmp_path: Path) -> None:
    p = expect_error(tmp_path, steps(f"  - host_connect: {{id: c, vm: a, port: 5, expect_error: ECONNRESTE}}  {MARK}\n"),
                     "unknown errno name 'ECONNRESTE'")
    assert "did you mean 'ECONNRESET'?" in p.message


# ---- steps: ids and references -----------------------------------------------------------------

def test_duplicate_id(tmp_path: Path) -> None:
    expect_error(tmp_path, steps(f"""\
        - host_listen: {{id: s, port: 5}}
        - host_listen: {{id: s, port: 6}}  {MARK}
    """), "duplicate id 's'")


def test_expect_unknown_id(tmp_path: Path) -> None:
    expect_error(tmp_path, steps(f"  - expect: {{id: srv, message: x}}  {MARK}\n"), "unknown id 'srv'")


def test_expect_id_defined_later(tmp_path: Path) -> None:
    expect_error(tmp_path, steps(f"""\
        - expect: {{id: srv, message: x}}  {MARK}
        - host_listen: {{id: srv, port: 5}}
    """), "defined by a later step")


def test_expect_needs_a_check(tmp_path: Path) -> None:
    expect_error(tmp_path, steps(f"""\
        - host_listen: {{id: s, port: 5}}
        - expect: {{id: s}}  {MARK}
    """), "nothing to check")


def test_expect_bad_sha256(tmp_path: Path) -> None:
    expect_error(tmp_path, steps(f"""\
        - host_listen: {{id: s, port: 5}}
        - expect: {{id: s, sha256: abc}}  {MARK}
    """), "expected 64 hex digits or 'pattern'")


def test_wait_for_event_must_fit_the_endpoint(tmp_path: Path) -> None:
    expect_error(tmp_path, steps(f"""\
        - host_listen: {{id: s, port: 5}}
        - wait_for: {{id: s, event: connected}}  {MARK}
    """), "'connected' does not happen to host_listen 's'")


def test_wait_for_forms_are_exclusive(tmp_path: Path) -> None:
    expect_error(tmp_path, steps(f"  - wait_for: {{vm: a, console: x, event: closed}}  {MARK}\n"),
                 "not both")


def test_wait_for_console_regex(tmp_path: Path) -> None:
    expect_error(tmp_path, steps(f"  - wait_for: {{vm: a, console: '[oops'}}  {MARK}\n"),
                 "invalid regular expression")


# ---- steps: qmp and faults -------------------------------------------------------------------------

def test_unknown_qmp_command_suggests(tmp_path: Path) -> None:
    p = expect_error(tmp_path, steps(f"  - qmp: {{vm: a, command: system_rest}}  {MARK}\n"),
                     "unknown QMP command 'system_rest'")
    assert "did you mean 'system_reset'?" in p.message


def test_device_del_needs_vsock_device(tmp_path: Path) -> None:
    expect_error(tmp_path, steps(f"  - qmp: {{vm: a, command: device_del, device: net0}}  {MARK}\n"),
                 "only the vsock device can be removed")


def test_qmp_expect_status(tmp_path: Path) -> None:
    expect_error(tmp_path, steps(f"  - qmp: {{vm: a, command: stop, expect_status: stopped}}  {MARK}\n"),
                 "unknown run state 'stopped'")


def test_fault_probability_range(tmp_path: Path) -> None:
    expect_error(tmp_path, "transport: vhost-user\n" + steps(
        f"  - fault: {{vm: a, kind: drop, probability: 1.5}}  {MARK}\n"), "probability: 1.5 is out of range")


def test_fault_delay_needs_delay_ms(tmp_path: Path) -> None:
    expect_error(tmp_path, "transport: vhost-user\n" + steps(
        f"  - fault: {{vm: a, kind: delay}}  {MARK}\n"), "'delay_ms' is required")


def test_fault_needs_vhost_user(tmp_path: Path) -> None:
    expect_error(tmp_path, "transport: vhost\n" + steps(
        f"  - fault: {{vm: a, kind: rst}}  {MARK}\n"), "uses transport vhost")


def test_fault_on_auto_transport_warns(tmp_path: Path) -> None:
    s = load_ok(tmp_path, steps("  - fault: {vm: a, kind: drop, probability: 0.1, duration: 5}\n"))
    assert len(s.warnings) == 1 and "transport auto" in s.warnings[0].message


# ---- parse_scenario and inline scenarios --------------------------------------------------------

def test_parse_scenario_from_string() -> None:
    s = parse_scenario("vms: [{name: a}]\n", filename="<test>")
    assert s.name == "scenario" and s.source is None
    with pytest.raises(ScenarioError) as info:
        parse_scenario("vms: [{name: a, cid: 2}]\n", filename="<test>")
    assert str(info.value).startswith("<test>:1:")


def test_inline_scenario_valid() -> None:
    s = inline_scenario(vms=[VmSpec(name="a", cid=3), VmSpec(name="b", cid=4)],
                        steps=[Step.of(HostListenStep(id="s", port=9999)),
                               Step.of(GuestConnectStep(id="c", vm="a", cid="host", port=9999, send="hi"))],
                        transport="vhost-user")
    assert s.name == "inline" and [v.transport for v in s.vms] == ["vhost-user"] * 2
    assert s.steps[1].params.cid == VMADDR_CID_HOST and s.steps[1].action == "guest_connect"
    assert s.vm("a").cid == 3
    with pytest.raises(KeyError):
        s.vm("zz")


def test_inline_scenario_invalid_reports_all() -> None:
    with pytest.raises(ScenarioError) as info:
        inline_scenario(vms=[VmSpec(name="a", cid=2), VmSpec(name="a")],
                        steps=[Step.of(HostListenStep(id="s", port=5, type="dgram")),
                               Step.of(RunStep(vm="x", command="true"))])
    messages = [p.message for p in info.value.problems]
    assert all(p.file == "<inline>" and p.line == 0 for p in info.value.problems)
    assert any("VMADDR_CID_HOST" in m for m in messages)
    assert any("duplicate VM name" in m for m in messages)
    assert any(m.endswith(DGRAM_ERROR) for m in messages)
    assert any("unknown VM 'x'" in m for m in messages)
    assert str(info.value).splitlines()[0].startswith("<inline>: ")


def test_validate_on_hand_built_scenario_and_warnings() -> None:
    s = Scenario(name="x", vms=[VmSpec(name="a")], steps=[Step.of(HostListenStep(id="s", port=22))])
    validate(s)
    assert len(s.warnings) == 1 and "privileged" in s.warnings[0].message
    s.steps.append(Step("sleep", SleepStep(seconds=True)))
    with pytest.raises(ScenarioError, match="seconds: expected a number"):
        validate(s)


def test_inline_wrong_params_type() -> None:
    with pytest.raises(ScenarioError, match="params must be a RunStep"):
        inline_scenario(vms=[VmSpec(name="a")], steps=[Step("run", SleepStep(seconds=1))])


def test_problem_str() -> None:
    assert str(Problem("f.yaml", 3, 7, "bad")) == "f.yaml:3:7: bad"
    assert str(Problem("<inline>", 0, 0, "bad")) == "<inline>: bad"


def test_docs_step_examples_validate() -> None:
    """Every one-line step example in docs/scenarios.md is valid (the docs cannot drift)."""
    import re

    doc = (REPO / "docs" / "scenarios.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", doc, re.S)
    examples = [line for block in blocks for line in block.splitlines() if line.startswith("- ")]
    assert len(examples) >= 15
    text = ("transport: vhost-user\nvms: [{name: a, cid: 3}, {name: b}, {name: guest}]\nsteps:\n"
            + "".join(f"  {line}\n" for line in examples))
    s = parse_scenario(text, filename="<docs>")
    assert len(s.steps) == len(examples) and s.warnings == []
    assert parse_scenario(blocks[0], filename="<docs>").name == "hello"


def test_send_list_is_one_message_each(tmp_path):
    scenario = load_ok(tmp_path, VMS + (
        "steps:\n"
        "  - guest_listen: {id: s, vm: a, port: 5000, type: seqpacket}\n"
        "  - guest_connect: {id: c, vm: b, cid: a, port: 5000, type: seqpacket, send: [one, two]}\n"))
    assert scenario.steps[1].params.send == ["one", "two"]


@pytest.mark.parametrize("value", ["[]", "[1, 2]", "{a: b}"])
def test_send_must_be_text_or_a_list_of_text(tmp_path, value):
    expect_error(tmp_path, VMS + (
        "steps:\n"
        f"  - guest_connect: {{id: c, vm: b, cid: a, port: 5000, send: {value}}}  {MARK}\n"), "send:")
