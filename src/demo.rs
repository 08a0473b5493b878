//! A generated, repeatable demo data set: users, teams, companies, groups, contacts across ten
//! states, notes and group memberships. Used by `crmsync up` and the benchmarks.

use serde_json::{Value as J, json};

use crmsync::model::Kind;

pub const STATES: [(&str, &[&str]); 10] = [
    ("NY", &["Albany", "Buffalo", "New York", "Rochester", "Syracuse"]),
    ("CT", &["Hartford", "New Haven", "Stamford"]),
    ("PA", &["Philadelphia", "Pittsburgh", "Harrisburg"]),
    ("NJ", &["Newark", "Trenton", "Princeton"]),
    ("MA", &["Boston", "Worcester", "Springfield"]),
    ("CA", &["Los Angeles", "San Francisco", "San Diego"]),
    ("TX", &["Austin", "Dallas", "Houston"]),
    ("IL", &["Chicago", "Springfield", "Peoria"]),
    ("WA", &["Seattle", "Spokane", "Tacoma"]),
    ("FL", &["Miami", "Orlando", "Tampa"]),
];
const FIRST: [&str; 16] = [
    "Ann", "Bob", "Carla", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jon", "Kemal", "Lena", "Mona", "Nils",
    "Olga", "Pablo",
];
const LAST: [&str; 16] = [
    "Adams", "Baker", "Chen", "Diaz", "Evans", "Fischer", "Garcia", "Hughes", "Ito", "Jensen", "Khan", "Lopez",
    "Moreau", "Novak", "Okafor", "Patel",
];
const TITLES: [&str; 6] = ["Owner", "Buyer", "Engineer", "Director", "Assistant", "Consultant"];
const INDUSTRIES: [&str; 5] = ["Retail", "Software", "Logistics", "Health", "Finance"];

/// The order records can be created in: each kind after the kinds it refers to. Records of
/// one phase can be written concurrently.
pub const PHASES: [&[Kind]; 6] =
    [&[Kind::Team], &[Kind::User], &[Kind::Company], &[Kind::Group], &[Kind::Contact], &[Kind::Note, Kind::Membership]];

pub use crmsync::rng::Rng;

/// How much to generate.
#[derive(Debug, Clone, Copy)]
pub struct DemoSize {
    pub contacts: usize,
    pub users: usize,
    pub companies: usize,
    pub groups: usize,
    /// One note for every this many contacts.
    pub note_every: usize,
}

impl DemoSize {
    pub fn for_contacts(contacts: usize) -> DemoSize {
        DemoSize { contacts, users: 20, companies: (contacts / 20).max(1), groups: 5, note_every: 2 }
    }
}

/// The records in creation order (parents before children), each a kind and a JSON body
/// with its id.
pub fn generate(size: DemoSize, seed: u64) -> Vec<(Kind, J)> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    people(&mut rng, size, &mut out);
    organizations(&mut rng, size, &mut out);
    for i in 0..size.contacts {
        contact(&mut rng, size, i, &mut out);
    }
    out
}

/// Teams and users.
fn people(rng: &mut Rng, size: DemoSize, out: &mut Vec<(Kind, J)>) {
    for t in 0..3 {
        out.push((Kind::Team, json!({ "id": format!("team-{t}"), "name": (["Sales", "Support", "Field"][t]) })));
    }
    for u in 0..size.users {
        let role = if u == 0 { "administrator" } else { ["manager", "standard", "standard", "restricted"][u % 4] };
        out.push((
            Kind::User,
            json!({
                "id": format!("user-{u}"),
                "name": format!("{} {}", rng.pick(&FIRST), rng.pick(&LAST)),
                "email": format!("user{u}@example.com"),
                "role": role,
                "teams": [format!("team-{}", u % 3)],
            }),
        ));
    }
}

/// Companies and groups.
fn organizations(rng: &mut Rng, size: DemoSize, out: &mut Vec<(Kind, J)>) {
    for c in 0..size.companies {
        let (state, cities) = rng.pick(&STATES);
        out.push((
            Kind::Company,
            json!({
                "id": format!("company-{c}"),
                "name": format!("{} {}", rng.pick(&LAST), ["Inc", "LLC", "Group", "Partners"][c % 4]),
                "industry": rng.pick(&INDUSTRIES),
                "city": rng.pick(cities),
                "state": state,
                "country": "US",
                "manager": format!("user-{}", c % size.users.max(1)),
                "access": "public",
            }),
        ));
    }
    for g in 0..size.groups {
        out.push((
            Kind::Group,
            json!({ "id": format!("group-{g}"), "name": (["Customers", "Prospects", "Partners", "Press", "Suppliers"][g % 5]), "access": "public" }),
        ));
    }
}

/// Contact `i`, with a note and a group membership for some.
fn contact(rng: &mut Rng, size: DemoSize, i: usize, out: &mut Vec<(Kind, J)>) {
    let (state, cities) = STATES[i % STATES.len()];
    let company = rng.below(size.companies.max(1));
    let first = rng.pick(&FIRST);
    let last = rng.pick(&LAST);
    let id = format!("contact-{i}");
    out.push((
        Kind::Contact,
        json!({
            "id": id,
            "first_name": first,
            "last_name": last,
            "company_id": format!("company-{company}"),
            "title": rng.pick(&TITLES),
            "phone": format!("+1 555 {:03} {:04}", rng.below(1000), rng.below(10_000)),
            "email": format!("{}.{}{}@example.com", first.to_lowercase(), last.to_lowercase(), i),
            "address1": format!("{} Main Street", 1 + rng.below(999)),
            "city": rng.pick(cities),
            "state": state,
            "zip": format!("{:05}", rng.below(100_000)),
            "country": "US",
            "manager": format!("user-{}", rng.below(size.users.max(1))),
            "access": "public",
            "custom": { "source": (["web", "fair", "referral"][i % 3]) },
        }),
    ));
    if size.note_every > 0 && i.is_multiple_of(size.note_every) {
        out.push((
            Kind::Note,
            json!({ "id": format!("note-{i}"), "contact_id": id, "text": format!("Met {first} about the {} order.", rng.pick(&INDUSTRIES).to_lowercase()) }),
        ));
    }
    if size.groups > 0 && i.is_multiple_of(4) {
        out.push((
            Kind::Membership,
            json!({ "id": format!("member-{i}"), "contact_id": id, "group_id": format!("group-{}", i % size.groups) }),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_data_and_every_record_is_valid() {
        let a = generate(DemoSize::for_contacts(50), 7);
        assert_eq!(a, generate(DemoSize::for_contacts(50), 7));
        assert_eq!(a.iter().filter(|(k, _)| *k == Kind::Contact).count(), 50);
        for (kind, body) in &a {
            crmsync::model::parse_input(*kind, body, true).unwrap_or_else(|e| panic!("{kind}: {e}"));
        }
    }
}
