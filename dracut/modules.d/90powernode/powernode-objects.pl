#!/usr/bin/perl
# powernode-objects STORE ENABLE LABEL=DIR...: check that every object the mounted
# composefs images (EROFS, at each DIR) point to is in STORE/objects, and with
# ENABLE=1 (first boot) enable fs-verity on each of them, in one walk.
#
# Why: with verity=require overlayfs only checks an object when the file is read,
# so a missing object would surface as an I/O error somewhere after switch-root.
# Walking the images before the pivot turns it into one refusal that names the
# object and the file needing it. One walk does both jobs: the objects the images
# reference are exactly the ones that need verity (others are never read).
#
# Why perl and syscall(): perl-base is Essential in Debian, so every rootfs has the
# binary (the initramfs carries it alone: no `use`, no modules), and lgetxattr(2)
# through syscall() costs one system call per file: ~10 000 files walk in seconds
# under TCG. getfattr would need the `attr` package in the rootfs and the
# initramfs and text parsing of its output.
#
# composefs (mkcomposefs) marks a file whose data is in the store with the xattr
# trusted.overlay.redirect = "/xx/<62 hex>" (relative to the data-only lower, the
# object store); inline and empty files have none.
#
# Prints "<files> files, <objects> objects checked, <n> fs-verity enabled" on
# success; on failure one line on stdout and exit 1.
my ($store, $enable, @images) = @ARGV;
sub refuse { print "@_\n"; exit 1; }

# lgetxattr's number depends on the syscall ABI, i.e. on the architecture this
# perl binary is built for: read it from our own ELF header (e_machine), which
# needs neither Config.pm nor uname.
my $elf = '';
if (open(my $self, '<', '/proc/self/exe')) { read($self, $elf, 20); close($self); }
my $machine = length($elf) == 20 ? unpack('v', substr($elf, 18, 2)) : -1;
my %LGETXATTR = (62 => 192, 183 => 9);    # EM_X86_64: x86_64 table; EM_AARCH64: generic table
my $SYS_lgetxattr = $LGETXATTR{$machine};
defined $SYS_lgetxattr or refuse("cannot check the object store: unknown architecture (ELF machine $machine)");

my $FS_IOC_ENABLE_VERITY = 0x40806685;    # _IOW('f', 133, struct fsverity_enable_arg)
# struct fsverity_enable_arg: version 1, SHA-256, 4096-byte blocks, no salt, no signature
my $arg = pack('LLLLQLLQ', 1, 1, 4096, 0, 0, 0, 0, 0) . ("\0" x 88);
my ($ENODATA, $EEXIST) = (61, 17);
# syscall() passes strings as pointers and needs writable scalars, not literals
my $XATTR = 'trusted.overlay.redirect';

my ($files, $enabled) = (0, 0);
my %seen;
for my $spec (@images) {
    my ($label, $root) = split(/=/, $spec, 2);
    my @dirs = ($root);
    while (defined(my $dir = pop @dirs)) {
        opendir(my $dh, $dir) or refuse("cannot read $dir in $label: $!");
        my @names = grep { $_ ne '.' && $_ ne '..' } readdir($dh);
        closedir($dh);
        for my $name (@names) {
            my $p = "$dir/$name";
            lstat($p) or refuse("cannot stat $p in $label: $!");
            if (-d _) { push @dirs, $p; next; }
            next unless -f _;
            $files++;
            my $buf = "\0" x 4096;
            my $n = syscall($SYS_lgetxattr, $p, $XATTR, $buf, 4096);
            if ($n < 0) {
                next if $! + 0 == $ENODATA;    # data inline in the image
                refuse("cannot read the redirect xattr of $p in $label: $!");
            }
            my $obj = substr($buf, 0, $n);
            my $file = substr($p, length($root)) || '/';
            $obj =~ m{^(/[0-9a-f]{2}/[0-9a-f]{62})$}
                or refuse("$file in $label points outside the object store ($obj)");
            next if $seen{$obj}++;
            my $o = "$store/objects$obj";
            lstat($o) && -f _
                or refuse("object " . substr($obj, 1) . " is missing from the store (needed by $file in $label)");
            next unless $enable;
            open(my $fh, '<', $o) or refuse("cannot open object " . substr($obj, 1) . ": $!");
            my $a = $arg;
            if (ioctl($fh, $FS_IOC_ENABLE_VERITY, $a)) {
                $enabled++;
            } elsif ($! + 0 != $EEXIST) {    # EEXIST: already enabled
                refuse("cannot enable fs-verity on object " . substr($obj, 1) . ": $!");
            }
            close($fh);
        }
    }
}
print "$files files, " . scalar(keys %seen) . " objects checked, $enabled fs-verity enabled\n";
