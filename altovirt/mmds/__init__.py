"""The microVM metadata service (Firecracker's MMDS): a JSON store the host fills through the
API and the guest reads over HTTP at a link-local address on its NIC.

:mod:`.store` holds the data and answers paths; :mod:`.token` makes and checks V2's session
tokens; :mod:`.http` answers the guest's requests; :mod:`.stack` is the network the guest
reaches it by (ARP, IPv4, TCP), in the NIC's own path: its frames never reach the tap.
"""
