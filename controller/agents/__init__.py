"""Node agents: enrolment (join token in, per-node credential out) and the heartbeat
endpoint that authenticates each agent as exactly one node."""
