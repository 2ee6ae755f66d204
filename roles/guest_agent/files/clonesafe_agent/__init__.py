# Copyright (c) clonesafe developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

"""clonesafe agent: regenerates this guest's secrets when it learns it is a clone, and proves it.

Runs inside every guest as root (installed by the clonesafe.fleet.guest_agent role). It serves
the host's requests (hello, rotate, attest) on the virtio-serial port org.clonesafe.agent.0,
reacts by itself to a VM Generation ID change (the kernel's "virtual machine fork" message, or the
NEW_VMGENID uevent) and, at boot, to an SMBIOS UUID that differs from the recorded one.

Every path is taken relative to ``--root`` (default /), so tests run every provider against a
temporary directory. Kernel-facing side effects (RNG ioctls, signalling sshd) happen only when the
root is /. Private key material never leaves this process except into its own files.

Where things are:
  __main__        the command line (serve, boot-check, status)
  serve           the service loop: the channel to the host, SIGIO, trigger watching
  triggers        the guest-side triggers (kmsg "virtual machine fork", NEW_VMGENID uevent)
  agent           state, one rotation, the host's requests (hello, rotate, attest)
  journal         all-or-nothing file changes across crashes
  files           durable writes and flushes
  entropy, keys   randomness for a rotation, the kernel RNG, key material
  interrupts      the channel's interrupt: steering to vCPUs, delivery counts
  config          defaults and the configuration file
  providers/      one module per secret behind the Provider interface (providers/base.py)
"""

AGENT_VERSION = "0.1.0"
