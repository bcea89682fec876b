"""The listening sockets: options that accepted connections inherit."""

from __future__ import annotations

import socket

from outcomewatch.listeners import Address, bind


def test_accepted_connections_send_without_waiting_for_delayed_acks() -> None:
    listener = bind(Address("127.0.0.1", 0))
    try:
        listener.listen()
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        try:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        finally:
            accepted.close()
            client.close()
    finally:
        listener.close()
