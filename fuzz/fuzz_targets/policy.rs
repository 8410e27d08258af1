//! The policy file parser and the decision function, on any text.
//!
//! Input: policy text, then after the first NUL, names to ask about (one per line). Checks,
//! beyond "no panic" (and no stack overflow in the TOML reader): a loaded policy can be asked
//! about any caller, action and name, answers the same when asked twice, and explains the answer
//! it gives.
#![no_main]

use keyward_policy::{credential_secret, decide, Action, Policy, Resource, Subject};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (policy_text, names) = text.split_once('\0').unwrap_or((text, "a\nb/c"));
    let Ok(policy) = Policy::from_toml(policy_text) else {
        return;
    };
    let callers = [
        (0, 0, None),
        (1000, 1000, Some("a.service")),
        (65534, 65534, None),
    ]
    .map(|(uid, gid, unit)| Subject {
        uid,
        gid,
        groups: &[10],
        unit,
    });
    for name in names.lines().take(8) {
        for caller in &callers {
            for action in Action::ALL {
                for resource in [Resource::Secret(name), Resource::Key(name), Resource::Vault] {
                    let first = decide(&policy, *caller, action, resource);
                    assert_eq!(first, decide(&policy, *caller, action, resource));
                    assert_eq!(first, policy.explain(*caller, action, resource).decision);
                }
            }
            let _ = credential_secret(&policy, caller.unit.unwrap_or(""), name);
        }
    }
});
