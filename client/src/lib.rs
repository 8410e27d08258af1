//! Client of the `keywardd` Varlink API (`org.keyward.Custodian`).
