//! Which quota applies to a user: the first `uploads.quotas.users` entry whose glob matches.

use config::{Config, UserQuota};

/// The first quota whose glob matches the user, when quotas are on.
pub(crate) fn quota_for<'a>(config: &'a Config, user_id: &str) -> Option<&'a UserQuota> {
    if !config.uploads.quotas.enabled {
        return None;
    }
    config
        .uploads
        .quotas
        .users
        .iter()
        .find(|q| glob_match(&q.glob, user_id))
}

/// `*` matches any run of characters, `?` one character.
fn glob_match(glob: &str, text: &str) -> bool {
    let (g, t): (Vec<char>, Vec<char>) = (glob.chars().collect(), text.chars().collect());
    let (mut gi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if gi < g.len() && (g[gi] == '?' || g[gi] == t[ti]) {
            gi += 1;
            ti += 1;
        } else if gi < g.len() && g[gi] == '*' {
            star = Some(gi);
            mark = ti;
            gi += 1;
        } else if let Some(s) = star {
            gi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    g[gi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("@*:*", "@alice:example.com"));
        assert!(glob_match(
            "@*:second.example.org",
            "@bob:second.example.org"
        ));
        assert!(!glob_match("@*:second.example.org", "@bob:example.com"));
        assert!(glob_match("@a?ice:*", "@alice:x"));
        assert!(!glob_match("@a?ice:*", "@aice:x"));
        assert!(glob_match("*", ""));
    }

    #[test]
    fn the_first_matching_rule_applies_and_only_when_quotas_are_on() {
        let mut config = Config::default();
        config.uploads.quotas.users = vec![
            UserQuota {
                glob: "@admin:*".into(),
                max_bytes: 0,
                max_pending: 0,
                max_files: 0,
            },
            UserQuota {
                glob: "@*:*".into(),
                max_bytes: 0,
                max_pending: 0,
                max_files: 3,
            },
        ];
        assert!(quota_for(&config, "@admin:x").is_none(), "quotas are off");
        config.uploads.quotas.enabled = true;
        assert_eq!(quota_for(&config, "@admin:x").map(|q| q.max_files), Some(0));
        assert_eq!(quota_for(&config, "@bob:x").map(|q| q.max_files), Some(3));
        assert!(quota_for(&config, "nobody").is_none());
    }
}
