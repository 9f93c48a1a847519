"""The nested test bed: Debian's own kernel in QEMU TCG (L1) with emulated AMD SVM, so that
unmodified Linux guests can boot under AltoVirt on hosts whose /dev/kvm is PVM."""
