"""The cluster agent: the pull-mode half of a cluster that the controller cannot reach
(``edgefleet-agent cluster``). See ``loop.py``."""
