"""Scan a kernel's sm_90 machine code (SASS) for writes to the registers of a wgmma still in flight.

A Hopper matrix product (`wgmma.mma_async`, SASS `HGMMA`) whose first operand A is in registers
reads those registers asynchronously: writing them before a `wgmma.wait_group` that retires that
product is undefined behaviour (PTX ISA, wgmma.wait_group). Triton 3.6 can emit exactly that in a
pipelined loop: it leaves up to three of a step's products in flight across the loop's back edge,
and the next step's first instructions build the next operand in the same registers (Triton issue
#9433; Triton 3.9 emits no such write in our kernels). In our forward kernel's state query it
stayed harmless while each step began by waiting for a load; with that load moved a step ahead, the
forward's results changed from run to run (benchmarks/RESULTS.md, attention kernels, run W).

    python tests/sass_audit.py KERNEL.cubin   # prints each write found
"""

import os
import re
import subprocess
import sys
import tempfile

import triton

_INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
# opcodes whose first operand is not a register they write
_NO_DESTINATION = ("ST", "BRA", "BAR", "WARPGROUP", "HGMMA", "RED", "EXIT", "RET", "CALL", "NOP", "DEPBAR",
                   "LDGSTS", "LDGDEPBAR", "MEMBAR", "FENCE", "SYNCS", "UTMA", "ERRBAR", "CCTL", "BSYNC", "BSSY",
                   "WARPSYNC", "YIELD", "BPT", "ELECT", "PREEXIT")
# opcodes that write a predicate first and then a register (SHFL.BFLY PT, R16, ...; ATOMG.E.ADD PT, R5,
# ...; LOP3.LUT P0, R4, ...): the register is their second operand
_PREDICATE_THEN_REGISTER = ("SHFL", "ATOM", "LOP3")
_PREDICATE = re.compile(r"^U?P[T0-9]$")
#: registers of a thread's fragment of A in one HGMMA (m64 x k16 of 16-bit numbers, or k8 of fp32)
A_REGISTERS = 4


def disassemble(cubin: bytes) -> str:
    """SASS of a cubin, through the nvdisasm that the triton wheel bundles."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-c", f.name], capture_output=True, text=True, check=True).stdout


def parse(sass: str) -> list[tuple[int, str, list[str]]]:
    """[(address, opcode, operands)] of the SASS text, predicates dropped and a branch's label
    replaced by the address it names."""
    rows, labels, pending = [], {}, []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        address = int(m.group(1), 16)
        for name in pending:
            labels[name] = address
        pending = []
        text = re.sub(r"^@!?U?P[T0-9]+\s+", "", m.group(2))
        opcode, _, operands = text.partition(" ")
        rows.append((address, opcode, [o.strip() for o in operands.split(",")] if operands else []))
    return [(a, op, [f"0x{labels[o.strip('`() ')]:x}" if o.strip("`() ") in labels else o for o in ops])
            for a, op, ops in rows]


def _written(opcode: str, operands: list[str]) -> set[int]:
    """The registers an instruction writes: its first operand (its second after a predicate, for
    _PREDICATE_THEN_REGISTER) and, for a wide result, the ones after it (128- and 64-bit accesses,
    ldmatrix's .4 / .2, IMAD.WIDE's pair, mma.sync's fragment)."""
    if opcode.startswith(_NO_DESTINATION) or not operands:
        return set()
    if opcode.startswith(_PREDICATE_THEN_REGISTER) and _PREDICATE.match(operands[0]) and len(operands) > 1:
        operands = operands[1:]
    m = re.match(r"^R(\d+)$", operands[0].split(".")[0])
    if not m:
        return set()
    if ".128" in opcode or opcode.endswith(".4") or (opcode.startswith("HMMA") and ".F32" in opcode):
        width = 4
    elif ".64" in opcode or opcode.endswith(".2") or ".WIDE" in opcode or opcode.startswith("HMMA"):
        width = 2
    else:
        width = 1
    return set(range(int(m.group(1)), int(m.group(1)) + width))


def _step(in_flight, row, found, where):
    """In-flight state after one instruction: (committed groups' A registers, the open group's)."""
    groups, open_group = in_flight
    address, opcode, operands = row
    if opcode.startswith("HGMMA"):
        a = re.match(r"^R(\d+)$", operands[1]) if len(operands) > 1 else None
        if a:
            open_group = open_group | set(range(int(a.group(1)), int(a.group(1)) + A_REGISTERS))
        if any(o.startswith("gsb0") for o in operands):  # the group is committed
            groups, open_group = groups + [open_group], set()
        return groups, open_group
    if opcode.startswith("WARPGROUP.DEPBAR"):  # wait until at most `keep` groups are in flight
        keep = int(operands[1], 16) if len(operands) > 1 else 0
        return (groups[len(groups) - keep:] if keep else []), open_group
    hit = _written(opcode, operands) & set().union(open_group, *groups)
    if hit:
        found.append(f"{where}{address:05x} {opcode} {', '.join(operands)}: writes R{min(hit)}, read by a wgmma in "
                     f"flight")
    return groups, open_group


def operand_hazards(sass: str) -> list[str]:
    """Each write to a register that a wgmma in flight reads as its operand A: in straight-line
    order, and in every loop (a backward branch) entered with what its own end leaves in flight."""
    rows = parse(sass)
    found = []
    state = ([], set())
    for row in rows:
        state = _step(state, row, found, "")
    index = {address: i for i, (address, _, _) in enumerate(rows)}
    for i, (address, opcode, operands) in enumerate(rows):
        target = re.fullmatch(r"0x([0-9a-f]+)", operands[-1]) if opcode == "BRA" and operands else None
        if not target or int(target.group(1), 16) > address or int(target.group(1), 16) not in index:
            continue
        body = rows[index[int(target.group(1), 16)]:i + 1]
        state = ([], set())
        for row in body:  # once to find what the loop leaves in flight, then again from it
            state = _step(state, row, [], "")
        for row in body:
            state = _step(state, row, found, f"loop {body[0][0]:05x}-{address:05x}: ")
    return sorted(set(found))


if __name__ == "__main__":
    with open(sys.argv[1], "rb") as f:
        hazards = operand_hazards(disassemble(f.read()))
    print("\n".join(hazards) or "none")
    sys.exit(1 if hazards else 0)
