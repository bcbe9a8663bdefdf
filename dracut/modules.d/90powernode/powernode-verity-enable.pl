#!/usr/bin/perl
# powernode-verity-enable: FS_IOC_ENABLE_VERITY on every file named on stdin (one
# path per line), in one process. `fsverity enable` takes one file per run, and
# starting it (with libcrypto) thousands of times dominates a first boot; perl-base
# is Essential in Debian, so the rootfs always has it. No `use`: the initramfs
# carries the perl binary only. A file that already has verity (EEXIST) is fine.
# Prints the number of files enabled; exits 1 naming the first file that fails.
my $FS_IOC_ENABLE_VERITY = 0x40806685;    # _IOW('f', 133, struct fsverity_enable_arg)
# struct fsverity_enable_arg: version 1, SHA-256, 4096-byte blocks, no salt, no signature
my $arg = pack('LLLLQLLQ', 1, 1, 4096, 0, 0, 0, 0, 0) . ("\0" x 88);
my $n = 0;
while (my $f = <STDIN>) {
    chomp $f;
    my $fh;
    if (!open($fh, '<', $f)) {
        print STDERR "$f: $!\n";
        exit 1;
    }
    my $a = $arg;
    if (!ioctl($fh, $FS_IOC_ENABLE_VERITY, $a)) {
        if ($! + 0 != 17) {    # EEXIST: already enabled
            print STDERR "$f: $!\n";
            exit 1;
        }
    } else {
        $n++;
    }
    close($fh);
}
print "$n\n";
