"""The hypervisor underneath: Xen ABI facts, the interface the engines use, the simulator, kernels.

Imports nothing else of xenstream.

* `abi` - page types (nibbles and 32-bit PFINFO codes), PTE bits and frame mask, Xen-reserved slots,
  cr3 encodings, vcpu_guest_context / start_info / shared_info layouts for 32- and 64-bit guests.
* `interface` - `Hypervisor`, the one protocol the save/restore engines talk to (spec
  save-restore-engines section 7), its value types and `HypervisorError`.
* `composite` - the restore-completion helpers of spec 7.6 built on that protocol.
* `pagetables` + `kernels` - batch translation hot paths (normalise / localise pagetable pages,
  v2 page-word packing; `v1batch`: v1 batch checks): cffi kernel or pure-Python twin.
* `sim` - `SimXen`, a simulated Xen implementing `Hypervisor` (plus harness and guest-side
  operations), `build_guest` for seeded realistic PV guests, and `PvGuest`, the guest kernel model.

A save engine's view of the protocol, in order (spec 3):
get_domain_info -> get_address_size -> get_max_mfn / m2p_view (/ compat_m2p_first_mfn for 3-level)
-> map_foreign(shared_info_frame) -> map_foreign(FLL, FLs, leaves) -> P2MView + TranslationTables
-> per 1024 pfns: get_page_types -> map_foreign -> copy tables into one buffer ->
kernels.normalise_pages -> kernels.pack_page_words -> write -> get_vcpu_context & co, get_tsc_info.
A restore engine: set_address_size -> populate_physmap (order 9 / 0) -> map_foreign(writable) ->
kernels.localise_pages in the record buffer -> copy -> set_vcpu_context -> mmuext_pin -> write the
P2M -> composite.seed_grant_table / console_ring_init.
"""
