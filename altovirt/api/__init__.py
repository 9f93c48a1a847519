"""The control API: QMP on the api-channel socket."""
