"""The network-namespace test lab: a client, a gateway and an origin namespace joined by veth
pairs, plus the origins that run in it (nginx, our scripted HTTP origin, a raw TCP server).

Everything here runs as root and touches only namespaces, devices and files that the lab itself
created, named with the pid of the run.  Nothing here sends traffic from the root namespace to
a non-loopback address: every client and server runs inside a lab namespace.

    netns.py      Lab, Namespace: build and tear down the topology, REDIRECT rules, clients
    origin.py     the test origin (`python -m tests.lab.origin`) and the deterministic bodies
    nginx.py      a private nginx serving static files, and make_file()
    rawserver.py  a scripted TCP server for exact-bytes tests
"""
