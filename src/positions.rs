//! Event ids of a sharded engine: where a node was in every shard it reads.
//!
//! With several engine shards, order is per shard (one Redis stream each) and every node
//! interleaves the shards in the order its readers happen to read them, so no single
//! stream id says what a client has seen. An event's id is instead a vector: the event's
//! own shard and stream id first, then, for every other shard the node reads, the stream
//! id of the last entry it had delivered from that shard when it delivered this event. A
//! client that received the event has received every event it matches, of every shard,
//! up to those positions; so `since` = any id from any node resumes each shard right
//! after its component. With one shard ids stay the stream's own `<ms>-<n>` (that is
//! not this module's business).
//!
//! The text is compact because it rides in every event: `<shard>.<ms>.<n>` for the own
//! component (base 36), then `_<shard>.<delta>.<n>` per other shard with the millisecond
//! part as a signed base-36 difference from the own one (streams move together, so it is
//! short), or `_<shard>` for a shard nothing was read from yet. Owns that format and
//! nothing else: no I/O, no clock.

/// A stream id `(ms, n)` (the same pair as `event::OrderKey`; this module stays a leaf).
pub type OrderKey = (u64, u64);

/// Positions per shard: `positions[s]` is the last stream id read from shard `s`
/// (`(0, 0)`: none).
pub type Positions = [OrderKey];

/// Longest id a client may send as `since` or `Last-Event-ID`: 64 shards of at most
/// 15 bytes each fit.
pub const MAX_POSITION_BYTES: usize = 1024;

/// The id of an event of shard `own` at stream id `key`, as a node at `positions`
/// (which already count the event; `None`: a shard the node does not read, left out, so
/// a resume takes it from the event's time) sees it.
pub fn encode(own: u32, key: OrderKey, positions: &[Option<OrderKey>]) -> String {
    let mut out = String::with_capacity(12 + positions.len() * 8);
    push_base36(&mut out, u64::from(own));
    out.push('.');
    push_base36(&mut out, key.0);
    out.push('.');
    push_base36(&mut out, key.1);
    for (shard, at) in positions.iter().enumerate() {
        let Some(at) = at.filter(|_| shard != own as usize) else { continue };
        out.push('_');
        push_base36(&mut out, shard as u64);
        if at == (0, 0) {
            continue;
        }
        out.push('.');
        match key.0.checked_sub(at.0) {
            Some(behind) => push_base36(&mut out, behind),
            None => {
                out.push('-');
                push_base36(&mut out, at.0 - key.0);
            }
        }
        out.push('.');
        push_base36(&mut out, at.1);
    }
    out
}

/// The own component of an id: what a publisher is answered before any node has read
/// the event (every other shard then resumes from the id's time).
pub fn encode_own(own: u32, key: OrderKey) -> String {
    encode(own, key, &[])
}

/// An id read back: the own shard, and a position per shard of `0..shards`. A shard the
/// id does not name is taken from the own component's millisecond (`(ms, 0)`): a
/// position in time rather than in the stream. `None` for anything not made by
/// [`encode`] for `shards` shards.
pub fn decode(id: &str, shards: u32) -> Option<(u32, Vec<OrderKey>)> {
    let mut components = id.split('_');
    let mut own = components.next()?.split('.');
    let own_shard = parse_base36(own.next()?)?;
    let key = (parse_base36(own.next()?)?, parse_base36(own.next()?)?);
    if own.next().is_some() || own_shard >= u64::from(shards) {
        return None;
    }
    let mut positions = vec![(key.0, 0); shards as usize];
    positions[own_shard as usize] = key;
    for component in components {
        let mut fields = component.split('.');
        let shard = parse_base36(fields.next()?)?;
        let slot = positions.get_mut(usize::try_from(shard).ok()?)?;
        *slot = match (fields.next(), fields.next()) {
            (None, _) => (0, 0),
            (Some(delta), Some(n)) => {
                let ms = match delta.strip_prefix('-') {
                    Some(ahead) => key.0.checked_add(parse_base36(ahead)?)?,
                    None => key.0.checked_sub(parse_base36(delta)?)?,
                };
                (ms, parse_base36(n)?)
            }
            (Some(_), None) => return None,
        };
        if fields.next().is_some() {
            return None;
        }
    }
    Some((own_shard as u32, positions))
}

fn push_base36(out: &mut String, mut n: u64) {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut buf = [0u8; 13];
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = DIGITS[(n % 36) as usize];
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.extend(buf[at..].iter().map(|&b| b as char));
}

fn parse_base36(text: &str) -> Option<u64> {
    // from_str_radix takes a sign and upper case too; ids are written in one form only.
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()) {
        return None;
    }
    u64::from_str_radix(text, 36).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_shards_behind_ahead_and_unread() {
        let positions = [(1_733_280_000_000, 4), (0, 0), (1_733_280_000_123, 0), (1_733_279_000_000, 77)];
        let id = encode(2, (1_733_280_000_123, 0), &positions.map(Some));
        assert_eq!(decode(&id, 4), Some((2, positions.to_vec())), "{id}");
        assert!(id.len() < 40, "{id} is compact");
        let ahead = [(1_733_280_000_500, 1), (1_733_280_000_100, 2)];
        let id = encode(1, (1_733_280_000_100, 2), &ahead.map(Some));
        assert!(id.contains("_0.-"), "{id}");
        assert_eq!(decode(&id, 2), Some((1, ahead.to_vec())));
    }

    #[test]
    fn the_own_component_alone_places_other_shards_at_its_time() {
        let id = encode_own(1, (5_000, 3));
        assert_eq!(decode(&id, 3), Some((1, vec![(5_000, 0), (5_000, 3), (5_000, 0)])));
    }

    #[test]
    fn a_shard_not_read_is_left_out_and_taken_from_the_events_time() {
        let id = encode(0, (9_000, 1), &[Some((9_000, 1)), None, Some((8_000, 2))]);
        assert_eq!(decode(&id, 3), Some((0, vec![(9_000, 1), (9_000, 0), (8_000, 2)])), "{id}");
    }

    #[test]
    fn refuses_what_it_did_not_make() {
        for bad in ["", "1733280000000-0", "9.1.1", "0.1", "0.1.1.1", "0.1.1_7.1.1", "0.1.1_1.1", "0.A.1", "0.+1.1"] {
            assert_eq!(decode(bad, 4), None, "{bad:?}");
        }
        assert_eq!(decode("0.1.1_1.2.0", 4), None, "a position before the epoch");
    }

    #[test]
    fn sixty_four_shards_fit_the_limit() {
        let positions: Vec<OrderKey> = (0..64).map(|s| (1_000_000_000_000 - s * 86_400_000, 1_000 + s)).collect();
        let id = encode(0, positions[0], &positions.iter().copied().map(Some).collect::<Vec<_>>());
        assert!(id.len() <= MAX_POSITION_BYTES, "{}", id.len());
        assert_eq!(decode(&id, 64), Some((0, positions)));
    }
}
