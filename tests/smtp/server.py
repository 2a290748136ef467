"""SMTP server for the end-to-end tests, built on aiosmtpd.

It listens on loopback and records every accepted message as one JSON line in the log
file, with the envelope sender, the envelope recipients, and the decoded Subject and
Message-ID. It rejects chosen recipients at RCPT TO. Each --temporary address gets 451
on its first attempt only, and each --permanent address gets 550 every time.

Once it accepts connections it prints "listening HOST PORT" on stdout. With --port 0,
the default, the operating system picks a free port.

Usage: python3 server.py --log FILE [--port N] [--temporary ADDR]... [--permanent ADDR]...
"""

import argparse
import asyncio
import email
import email.policy
import json
import sys

try:
    from aiosmtpd.smtp import SMTP
except ImportError as error:
    sys.exit(
        f"failed to import aiosmtpd ({error}): "
        "install it with `python3 -m pip install -r tests/requirements.txt`"
    )

TEMPORARY_REPLY = "451 4.3.0 Mailbox busy, try again later"
PERMANENT_REPLY = "550 5.1.1 Mailbox unavailable"


class RecordingHandler:
    """Accepts or rejects recipients by the configured sets and logs accepted messages."""

    def __init__(self, log_path, temporary, permanent):
        self.log_path = log_path
        self.temporary = {address.lower() for address in temporary}
        self.permanent = {address.lower() for address in permanent}
        self.deferred = set()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        key = address.lower()
        if key in self.permanent:
            return PERMANENT_REPLY
        if key in self.temporary and key not in self.deferred:
            self.deferred.add(key)
            return TEMPORARY_REPLY
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "subject": str(message.get("Subject", "")),
            "message_id": str(message.get("Message-ID", "")),
        }
        # The file is closed before the reply, so a message is on disk once the client
        # has its 250.
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(json.dumps(record, ensure_ascii=False) + "\n")
        return "250 2.0.0 Message accepted"


async def serve(args):
    handler = RecordingHandler(args.log, args.temporary, args.permanent)
    loop = asyncio.get_running_loop()
    # A fixed hostname avoids aiosmtpd's reverse DNS lookup of this machine.
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="localhost", enable_SMTPUTF8=True),
        host=args.host,
        port=args.port,
    )
    port = server.sockets[0].getsockname()[1]
    print(f"listening {args.host} {port}", flush=True)
    await server.serve_forever()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", required=True, help="file that receives one JSON line per message")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port to listen on, 0 for any free one")
    parser.add_argument(
        "--temporary", action="append", default=[], help="recipient rejected with 451 on its first attempt"
    )
    parser.add_argument(
        "--permanent", action="append", default=[], help="recipient always rejected with 550"
    )
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
