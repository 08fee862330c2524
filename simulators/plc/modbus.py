"""Modbus/TCP server output (pymodbus 3.16 SimDevice API): a documented holding-register map, unit id 1."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from simulators.plc.results import DECISION_CODES, BridgeStatus, CameraStatus, Decision, ServerThread, Update

UNIT_ID = 1
MAP_VERSION = 1
BRIDGE_BLOCK = 16  # registers 0..15
CAMERA_BLOCK = 16  # registers per camera; camera i starts at BRIDGE_BLOCK + i * CAMERA_BLOCK
DEFAULT_MAX_CAMERAS = 16

# Bridge block offsets.
HR_TOTAL = 0  # U32 total results, high word first
HR_BRIDGE_STATUS = 2
HR_CAMERAS = 3
HR_AGENTS_UP = 4
HR_AGENTS = 5
HR_EXCEPTIONS = 6  # U32: requests answered with a Modbus exception
HR_MAP_VERSION = 8
HR_CAMERA_BLOCK = 9
HR_FIRST_CAMERA = 10
HR_MAX_CAMERAS = 11

# Camera block offsets.
CAM_STATUS = 0
CAM_COUNTER = 1  # U32
CAM_SEQ = 3  # U32 (low 32 bits of the seq)
CAM_DECISION = 5
CAM_CLASS = 6
CAM_CONFIDENCE = 7  # x10000
CAM_ACK = 8  # the only writable register: the PLC writes the low word of the counter it has taken
CAM_DIVERTS = 9  # U32
CAM_FAILSAFES = 11  # U32

# Status bits (bridge block register 2 and camera block register 0).
BIT_READY = 1 << 0
BIT_NEW_RESULT = 1 << 1  # camera: counter low word != ack register
BIT_FAIL_SAFE = 1 << 2
BIT_AGENT_LOST = 1 << 3  # bridge: no agent up
BIT_STARTING = 1 << 4  # bridge only

NO_CLASS = 0xFFFF
READ_FCS = frozenset({3})
WRITE_FCS = frozenset({6, 16, 23})

log = logging.getLogger("tdn.plc.modbus")


def u32(value: int) -> tuple[int, int]:
    """(high word, low word) of the low 32 bits."""
    value &= 0xFFFFFFFF
    return value >> 16, value & 0xFFFF


class RegisterImage:
    """The holding-register image without sockets: apply Updates, validate PLC writes, read ranges."""

    def __init__(self, cameras: list[str] | None = None, max_cameras: int = DEFAULT_MAX_CAMERAS) -> None:
        self.max_cameras = max_cameras
        self.size = BRIDGE_BLOCK + CAMERA_BLOCK * max_cameras
        self.regs = [0] * self.size
        self.order: dict[str, int] = {}
        self.unmapped: set[str] = set()  # cameras beyond max_cameras (counted in the total only)
        self.rejected: Counter[str] = Counter()
        self.acks = 0
        for cam in cameras or []:
            self._slot(cam)
        self.regs[HR_MAP_VERSION] = MAP_VERSION
        self.regs[HR_CAMERA_BLOCK] = CAMERA_BLOCK
        self.regs[HR_FIRST_CAMERA] = BRIDGE_BLOCK
        self.regs[HR_MAX_CAMERAS] = max_cameras
        self.regs[HR_BRIDGE_STATUS] = BIT_STARTING | BIT_FAIL_SAFE | BIT_AGENT_LOST

    def _slot(self, camera_id: str) -> int | None:
        slot = self.order.get(camera_id)
        if slot is None:
            if len(self.order) >= self.max_cameras:
                self.unmapped.add(camera_id)
                return None
            slot = self.order[camera_id] = len(self.order)
            self.regs[HR_CAMERAS] = len(self.order)
        return slot

    def base(self, camera_id: str) -> int | None:
        """First register of the camera's block, None when it has no slot."""
        slot = self.order.get(camera_id)
        return None if slot is None else BRIDGE_BLOCK + CAMERA_BLOCK * slot

    def apply(self, update: Update) -> None:
        """Fold an update into the registers."""
        for cam in update.cameras:
            self._camera(cam)
        self._bridge(update.bridge)

    def _camera(self, cam: CameraStatus) -> None:
        if self._slot(cam.camera_id) is None:
            return
        b = self.base(cam.camera_id)
        assert b is not None
        r = self.regs
        r[b + CAM_COUNTER], r[b + CAM_COUNTER + 1] = u32(cam.counter)
        last = cam.last
        if last is not None:
            r[b + CAM_SEQ], r[b + CAM_SEQ + 1] = u32(last.seq)
            r[b + CAM_DECISION] = DECISION_CODES[last.decision]
            r[b + CAM_CLASS] = NO_CLASS if last.class_index is None else last.class_index & 0xFFFF
            r[b + CAM_CONFIDENCE] = min(10000, round((last.confidence or 0.0) * 10000))
        r[b + CAM_DIVERTS], r[b + CAM_DIVERTS + 1] = u32(cam.count(Decision.DIVERT))
        r[b + CAM_FAILSAFES], r[b + CAM_FAILSAFES + 1] = u32(cam.count(Decision.FAIL_SAFE))
        status = BIT_READY if not cam.fail_safe else 0
        status |= BIT_FAIL_SAFE if cam.fail_safe else 0
        status |= BIT_AGENT_LOST if cam.agent_lost else 0
        r[b + CAM_STATUS] = status
        self._new_bit(b)

    def _new_bit(self, b: int) -> None:
        if self.regs[b + CAM_COUNTER + 1] != self.regs[b + CAM_ACK]:
            self.regs[b + CAM_STATUS] |= BIT_NEW_RESULT
        else:
            self.regs[b + CAM_STATUS] &= ~BIT_NEW_RESULT

    def _bridge(self, b: BridgeStatus) -> None:
        r = self.regs
        r[HR_TOTAL], r[HR_TOTAL + 1] = u32(b.total)
        status = BIT_READY if b.ready else 0
        status |= BIT_FAIL_SAFE if b.fail_safe else 0
        status |= BIT_AGENT_LOST if b.agents_up == 0 else 0
        status |= BIT_STARTING if b.starting else 0
        r[HR_BRIDGE_STATUS] = status
        r[HR_AGENTS_UP], r[HR_AGENTS] = min(b.agents_up, 0xFFFF), min(b.agents, 0xFFFF)

    def count_exception(self) -> None:
        """One more request answered with an exception (shown in registers 6-7)."""
        total = (self.regs[HR_EXCEPTIONS] << 16 | self.regs[HR_EXCEPTIONS + 1]) + 1
        self.regs[HR_EXCEPTIONS], self.regs[HR_EXCEPTIONS + 1] = u32(total)

    def check_write(self, address: int, values: list[int]) -> ExcCodes | None:
        """Accept a PLC write (ack registers only, value <= the counter's low word), else the exception code."""
        for i, value in enumerate(values):
            addr = address + i
            if addr < BRIDGE_BLOCK or (addr - BRIDGE_BLOCK) % CAMERA_BLOCK != CAM_ACK:
                self.rejected["read_only"] += 1
                return ExcCodes.ILLEGAL_ADDRESS
            slot = (addr - BRIDGE_BLOCK) // CAMERA_BLOCK
            if slot >= len(self.order):
                self.rejected["no_camera"] += 1
                return ExcCodes.ILLEGAL_ADDRESS
            low = self.regs[addr - CAM_ACK + CAM_COUNTER + 1]
            # Acknowledging a result that does not exist yet is garbage (16-bit wrap-around aware).
            if not 0 <= value <= 0xFFFF or 0 < (value - low) % 0x10000 < 0x8000:
                self.rejected["bad_ack"] += 1
                return ExcCodes.ILLEGAL_VALUE
        for i, value in enumerate(values):
            self.regs[address + i] = value
            self._new_bit(address + i - CAM_ACK)
            self.acks += 1
        return None


class ModbusOutput(ServerThread):
    """A pymodbus TCP server in its own thread and loop, serving a RegisterImage."""

    name = "modbus"
    label = "Modbus"

    def __init__(self, endpoint: str, cameras: list[str] | None = None,
                 max_cameras: int = DEFAULT_MAX_CAMERAS) -> None:
        host, sep, port = endpoint.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"Modbus endpoint {endpoint!r}: expected HOST:PORT")
        self.address = (host.strip("[]"), int(port))
        self.image = RegisterImage(cameras, max_cameras)
        super().__init__()
        self._stop: asyncio.Event | None = None
        self.requests = 0
        self.exceptions = 0

    def deliver(self, update: Update) -> None:
        """Apply an update in the server's loop (no locks: requests are served on that loop too)."""
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.image.apply, update)

    def stop(self) -> None:
        """Close the listener and join the thread."""
        if self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)

    def stats(self) -> dict[str, Any]:
        """Counters for the bridge report."""
        return {"requests": self.requests, "exceptions": self.exceptions, "rejected": dict(self.image.rejected),
                "acks": self.image.acks, "cameras": dict(self.image.order), "unmapped": sorted(self.image.unmapped)}

    async def _action(self, function_code: int, start_address: int, address: int, count: int,
                      registers: list[int], set_values: list[int] | list[bool] | None) -> ExcCodes | None:
        if set_values is None:
            # Write requests read back what they wrote (FC 6/16 echo, FC 23 reads), so they pass here too.
            if function_code not in READ_FCS | WRITE_FCS:
                self.image.rejected["function"] += 1
                return ExcCodes.ILLEGAL_FUNCTION
            lo = address - start_address
            registers[lo:lo + count] = self.image.regs[address:address + count]
            return None
        if function_code not in WRITE_FCS:
            self.image.rejected["function"] += 1
            return ExcCodes.ILLEGAL_FUNCTION
        return self.image.check_write(address, [int(v) for v in set_values])

    def _trace(self, sending: bool, data: bytes) -> bytes:
        # Count on the wire: every answer with the exception bit, whichever layer of pymodbus produced it.
        if sending:
            self.requests += 1
            if len(data) >= 8 and data[7] & 0x80:
                self.exceptions += 1
                self.image.count_exception()
        return data

    async def _main(self) -> None:
        device = SimDevice(id=UNIT_ID, simdata=[SimData(address=0, count=self.image.size,
                                                        datatype=DataType.REGISTERS)], action=self._action)
        server = ModbusTcpServer(context=device, address=self.address, trace_packet=self._trace)
        self._stop = asyncio.Event()
        await server.serve_forever(background=True)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await server.shutdown()
