"""`clusterrep certs`: create the cluster's CA and a certificate per member, for TLS."""

from __future__ import annotations

import argparse

from ..pki import LOOPBACK, issue, parse_member


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "certs", help="create a CA and TLS certificates for the cluster's members",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write DIR/ca.pem and DIR/ca.key (a new CA, or the one already in DIR) and, "
                    "per MEMBER,\nDIR/NAME.pem and DIR/NAME.key. A certificate's common name is "
                    "its member's identity;\nits subjectAltNames are only the addresses others "
                    "dial it at. Keys are written mode 0600.\nCopy ca.pem and a member's own pair "
                    "to its host; keep ca.key offline.",
        epilog="Members: NAME or NAME=ADDR[,ADDR...]. NAME is a node's --id, 'coordinator' or "
               "'replica' (the\nidentity each presents); the status tools may use any "
               "certificate from the CA.\n\nexample:\n"
               "  clusterrep certs ./pki replica=10.0.0.5 coordinator=10.0.0.6 h1 h2 cli\n"
               "  clusterrep replica --listen 10.0.0.5:7400 ... --tls-cert pki/replica.pem "
               "--tls-key pki/replica.key --tls-ca pki/ca.pem")
    p.add_argument("dir", metavar="DIR", help="where to write (created if missing)")
    p.add_argument("members", nargs="+", metavar="MEMBER", help="NAME or NAME=ADDR[,ADDR...]")
    p.add_argument("--loopback", action="store_true",
                   help=f"also name {', '.join(LOOPBACK)} in every certificate (one-machine "
                        "clusters and tests)")
    p.add_argument("--force", action="store_true",
                   help="replace a member's existing certificate and key")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    members = [parse_member(spec) for spec in args.members]
    for path in issue(args.dir, members, loopback=args.loopback, force=args.force):
        print(f"wrote {path}")
    return 0
