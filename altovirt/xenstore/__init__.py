"""An embedded XenStore: the store, its wire protocol, and the host's socket."""
