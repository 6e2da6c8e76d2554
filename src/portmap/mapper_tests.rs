//! Mapper tests against a fake NAT-PMP gateway on a loopback address.
