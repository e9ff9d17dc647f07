"""PLC adapters of a triggered line: the handshake state machine (handshake.py, written once) and the
protocols that carry it (modbus.py: Modbus TCP with a fixed map; opcua.py: OPC UA Machine Vision)."""
