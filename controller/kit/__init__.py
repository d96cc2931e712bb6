"""Shared vocabulary of every domain: the manifest envelope and its field types, the
apply outcome and diff, Kubernetes quantities and Go-style durations. It imports no
domain, nor kube, api or cli, so any layer may import it."""
