"""The hypervisor underneath: Xen ABI facts, the interface the engines use, the simulator, real bindings.

Imports nothing else of xenstream.
"""
