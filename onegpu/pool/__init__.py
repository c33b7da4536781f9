"""The virtual accelerator: a pool of devices, flavors of it, leases on its devices and their usage."""
