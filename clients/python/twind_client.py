#!/usr/bin/env python3
"""A twind client in Python, using only Debian's python3-grpcio and
python3-protobuf: no generated code.

The message types come from a descriptor set of the API, which buf writes:

    go tool -modfile=proto/tools.mod buf build -o /tmp/twin.binpb
    python3 clients/python/twind_client.py --descriptors /tmp/twin.binpb --addr localhost:50051

The program plays an operator and a device: it creates a fridge twin, sets
its desired state, sends a command while the fridge is offline, connects as
the fridge over DeviceService.Connect, receives the command, acknowledges
it, reports state, and checks the result through the operator API.
"""

import argparse
import queue
import sys
import uuid

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory


class Api:
    """Message classes and method stubs built from a descriptor set."""

    def __init__(self, descriptor_path, channel, token=""):
        self.metadata = [("authorization", f"Bearer {token}")] if token else None
        with open(descriptor_path, "rb") as f:
            fds = descriptor_pb2.FileDescriptorSet.FromString(f.read())
        self.pool = descriptor_pool.DescriptorPool()
        for fd in fds.file:
            self.pool.Add(fd)
        self.channel = channel
        self._factory = None

    def message(self, name):
        desc = self.pool.FindMessageTypeByName(name)
        if hasattr(message_factory, "GetMessageClass"):  # protobuf >= 4.21
            return message_factory.GetMessageClass(desc)
        if self._factory is None:
            self._factory = message_factory.MessageFactory(self.pool)
        return self._factory.GetPrototype(desc)

    def new(self, name, value=None):
        """A message of type name, filled from a dict in JSON form."""
        msg = self.message(name)()
        if value:
            json_format.ParseDict(value, msg)
        return msg

    def unary(self, service, method):
        req, resp = self.message(f"twin.v1.{method}Request"), self.message(f"twin.v1.{method}Response")
        return self.channel.unary_unary(
            f"/twin.v1.{service}/{method}",
            request_serializer=req.SerializeToString,
            response_deserializer=resp.FromString,
        )

    def call(self, service, method, request, timeout=10):
        """Calls a unary method with a request given as a dict; returns a dict."""
        req = self.new(f"twin.v1.{method}Request", request)
        resp = self.unary(service, method)(req, timeout=timeout, metadata=self.metadata)
        return json_format.MessageToDict(resp, preserving_proto_field_name=True)

    def connect(self, requests):
        req, resp = self.message("twin.v1.ConnectRequest"), self.message("twin.v1.ConnectResponse")
        stream = self.channel.stream_stream(
            "/twin.v1.DeviceService/Connect",
            request_serializer=req.SerializeToString,
            response_deserializer=resp.FromString,
        )
        return stream(requests, timeout=30)


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def run(api):
    device = f"fridge-py-{uuid.uuid4().hex[:8]}"
    twins, commands = "TwinService", "CommandService"

    # The operator creates the twin and says what it should be.
    api.call(twins, "CreateTwin", {"twin": {"id": device, "type": "fridge", "labels": {"client": "python"}}})
    t = api.call(twins, "UpdateDesired", {"id": device, "patch": {"target_c": 4, "eco": True}})["twin"]
    check(t["delta"] == {"target_c": 4, "eco": True}, f"delta after UpdateDesired: {t['delta']}")
    token = api.call(twins, "IssueDeviceToken", {"id": device})["token"]
    cmd = api.call(commands, "SendCommand", {"device_id": device, "name": "defrost", "params": {"minutes": 20}})["command"]
    check(cmd["state"] == "COMMAND_STATE_QUEUED", f"command to an offline fridge: {cmd['state']}")
    print(f"created {device}, desired version {t['version']}, queued command {cmd['id']}")

    # The fridge connects. Requests go through a queue that the stream reads.
    outbox = queue.Queue()

    def requests():
        while True:
            m = outbox.get()
            if m is None:
                return
            yield m

    def send(value):
        outbox.put(api.new("twin.v1.ConnectRequest", value))

    send({"hello": {"device_id": device, "token": token}})
    responses = api.connect(requests())
    try:
        welcome = json_format.MessageToDict(next(responses), preserving_proto_field_name=True)
        check("welcome" in welcome, f"first message: {welcome}")
        w = welcome["welcome"]
        check(w["desired"] == {"target_c": 4, "eco": True}, f"welcome desired: {w}")
        print(f"welcome at version {w['version']}: desired {w['desired']}")

        m = json_format.MessageToDict(next(responses), preserving_proto_field_name=True)
        check(m.get("command", {}).get("id") == cmd["id"], f"expected the queued command, got {m}")
        print(f"received command {m['command']['name']} {m['command'].get('params')}")
        send({"command_update": {"command_id": cmd["id"], "state": "COMMAND_STATE_ACCEPTED"}})
        send({"command_update": {"command_id": cmd["id"], "state": "COMMAND_STATE_SUCCEEDED", "result": {"defrosted": True}}})
        send({"desired_ack": {"version": w["version"]}})
        send({"report": {"seq": 1, "patch": {"temp_c": 4.2, "door": "closed", "target_c": 4, "eco": True}}})
        for m in responses:
            m = json_format.MessageToDict(m, preserving_proto_field_name=True)
            if "report_ack" in m:
                ack = m["report_ack"]
                check(ack.get("error", "") == "" and int(ack["seq"]) == 1, f"report ack: {ack}")
                print(f"report acknowledged at version {ack['version']}")
                break
    finally:
        outbox.put(None)  # close our side; the server answers what is left and ends
        for _ in responses:
            pass

    # The operator sees the outcome.
    got = api.call(commands, "GetCommand", {"id": cmd["id"]})["command"]
    check(got["state"] == "COMMAND_STATE_SUCCEEDED" and got["result"] == {"defrosted": True}, f"command after the device: {got}")
    t = api.call(twins, "GetTwin", {"id": device})["twin"]
    check(t["reported"]["temp_c"] == 4.2 and not t.get("delta"), f"twin after the report: {t}")
    check(int(t["desired_acked_version"]) >= 2, f"desired_acked_version: {t.get('desired_acked_version')}")
    api.call(twins, "DeleteTwin", {"id": device})
    print(f"command {got['id']} {got['state']}; {device} in sync; deleted")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--addr", default="localhost:50051")
    p.add_argument("--descriptors", required=True, help="descriptor set written by buf build")
    p.add_argument("--token", default="", help="API token, if the server requires one (twind --api-token)")
    args = p.parse_args()
    with grpc.insecure_channel(args.addr) as channel:
        api = Api(args.descriptors, channel, args.token)
        try:
            run(api)
        except (AssertionError, grpc.RpcError) as e:
            print(f"FAILED: {e}", file=sys.stderr)
            print("0 passed, 1 failed")
            return 1
    print("1 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
