"""The local platform: dstack's guest agent and KMS, reimplemented for confidential VMs."""
