"""Real parts on one machine for corevault's tests, benchmarks and demo.

Not shipped with corevault: runc containers with Kubernetes-style cgroups, a crash
corpus compiled from C and C++, and a guard that puts the host's core settings back.
"""
