#!/usr/bin/env python3
"""The baseline for `cargo bench --bench relay`: one logging client the way
practable analytics hosts run them today (learning-analytics-server's
client.py and process.AddUserLog), one process per stream: websocket-client's
WebSocketApp.run_forever(), json.loads per message, and the message appended
to <user>-<hardware>-<exp>-<course>.json (open, write, close) per message.

Usage: relay_client.py URL DATA_DIR
"""
import json
import os
import sys

import websocket

URL, DATA_DIR = sys.argv[1], sys.argv[2]


def add_user_log(message):
    try:
        filename = '%s-%s-%s-%s.json' % (message["user"], message["hardware"],
                                         message["exp"], message["course"])
        with open(os.path.join(DATA_DIR, filename), 'a') as outfile:
            outfile.write(json.dumps(message))
            outfile.write('\n')
    except Exception:
        pass


def on_message(ws, message):
    try:
        mes = json.loads(message)
    except Exception as e:
        print(e)
        return
    if mes.get("type") == "analytics":
        add_user_log(mes)


def on_close(ws, code, msg):
    print("connection lost...exiting")


websocket.WebSocketApp(URL, on_message=on_message, on_close=on_close).run_forever()
