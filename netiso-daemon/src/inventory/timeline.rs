//! Who held each IP address when: a drop is attributed to the pod that held the address at the
//! moment of the drop, even if the address has been reused since.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::cluster::PodInfo;

/// What the timeline remembers of a pod: enough to name it and evaluate policies for it after
/// it is gone.
#[derive(Clone, Debug, PartialEq)]
pub struct PodSnapshot {
    pub uid: String,
    pub info: PodInfo,
    pub workload: Option<crate::cluster::Workload>,
}

#[derive(Clone, Debug)]
struct Holding {
    pod: Arc<PodSnapshot>,
    from: SystemTime,
    /// `None` while the pod still holds the address.
    until: Option<SystemTime>,
}

#[derive(Debug, Default)]
pub struct IpTimeline {
    holdings: HashMap<IpAddr, Vec<Holding>>,
}

impl IpTimeline {
    /// Records that `pod` holds exactly `ips` as of `at` (`since` backdates a first sighting to
    /// the pod's start). Addresses it no longer holds are closed at `at`.
    pub fn update(&mut self, pod: Arc<PodSnapshot>, ips: &[IpAddr], at: SystemTime, since: Option<SystemTime>) {
        for (ip, list) in self.holdings.iter_mut() {
            if ips.contains(ip) {
                continue;
            }
            for h in list.iter_mut().filter(|h| h.until.is_none() && h.pod.uid == pod.uid) {
                h.until = Some(at);
            }
        }
        for ip in ips {
            let list = self.holdings.entry(*ip).or_default();
            // Another pod that still appears to hold the address lost it now.
            for h in list.iter_mut().filter(|h| h.until.is_none() && h.pod.uid != pod.uid) {
                h.until = Some(at);
            }
            match list.iter_mut().find(|h| h.until.is_none() && h.pod.uid == pod.uid) {
                Some(open) => open.pod = pod.clone(),
                None => {
                    let start = since
                        .filter(|s| *s < at && list.iter().all(|h| h.until.is_some_and(|u| u <= *s)))
                        .unwrap_or(at);
                    list.push(Holding { pod: pod.clone(), from: start, until: None });
                }
            }
        }
    }

    /// The pod with `uid` released its addresses at `at` (deleted, or gone from a relist).
    pub fn release(&mut self, uid: &str, at: SystemTime) {
        for list in self.holdings.values_mut() {
            for h in list.iter_mut().filter(|h| h.until.is_none() && h.pod.uid == uid) {
                h.until = Some(at);
            }
        }
    }

    /// Uids of pods that hold an address now.
    pub fn current_holders(&self) -> Vec<String> {
        let mut uids: Vec<String> =
            self.holdings.values().flatten().filter(|h| h.until.is_none()).map(|h| h.pod.uid.clone()).collect();
        uids.sort();
        uids.dedup();
        uids
    }

    /// The pod that held `ip` at `at`.
    pub fn holder(&self, ip: IpAddr, at: SystemTime) -> Option<Arc<PodSnapshot>> {
        self.holdings
            .get(&ip)?
            .iter()
            .rev()
            .find(|h| h.from <= at && h.until.is_none_or(|u| at < u))
            .map(|h| h.pod.clone())
    }

    /// Forgets holdings that ended before `horizon` (older than the evidence retention).
    pub fn prune(&mut self, now: SystemTime, keep: Duration) {
        let horizon = now.checked_sub(keep).unwrap_or(SystemTime::UNIX_EPOCH);
        self.holdings.retain(|_, list| {
            list.retain(|h| h.until.is_none_or(|u| u >= horizon));
            !list.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, name: &str) -> Arc<PodSnapshot> {
        Arc::new(PodSnapshot {
            uid: uid.into(),
            info: PodInfo {
                namespace: "ns".into(),
                name: name.into(),
                labels: Default::default(),
                ips: vec![],
                ports: vec![],
                host_network: false,
                node: None,
            },
            workload: None,
        })
    }

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    #[test]
    fn a_reused_address_is_attributed_by_time() {
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        let mut tl = IpTimeline::default();
        tl.update(pod("a", "pod-a"), &[ip], t(10), None);
        tl.release("a", t(20));
        tl.update(pod("b", "pod-b"), &[ip], t(25), None);
        assert_eq!(tl.holder(ip, t(15)).unwrap().info.name, "pod-a");
        assert!(tl.holder(ip, t(22)).is_none(), "nobody held it in between");
        assert_eq!(tl.holder(ip, t(30)).unwrap().info.name, "pod-b");
        assert!(tl.holder(ip, t(5)).is_none());
    }

    #[test]
    fn a_missed_delete_is_closed_when_another_pod_takes_the_address() {
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        let mut tl = IpTimeline::default();
        tl.update(pod("a", "pod-a"), &[ip], t(10), None);
        tl.update(pod("b", "pod-b"), &[ip], t(30), None);
        assert_eq!(tl.holder(ip, t(29)).unwrap().info.name, "pod-a");
        assert_eq!(tl.holder(ip, t(31)).unwrap().info.name, "pod-b");
        assert_eq!(tl.current_holders(), vec!["b".to_owned()]);
    }

    #[test]
    fn first_sighting_is_backdated_to_the_pod_start_and_history_is_pruned() {
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let mut tl = IpTimeline::default();
        tl.update(pod("a", "pod-a"), &[ip], t(100), Some(t(50)));
        assert_eq!(tl.holder(ip, t(60)).unwrap().info.name, "pod-a");
        tl.release("a", t(200));
        tl.prune(t(250), Duration::from_secs(100));
        assert!(tl.holder(ip, t(60)).is_some(), "ended 50 s ago, within the 100 s kept");
        tl.prune(t(400), Duration::from_secs(100));
        assert!(tl.holder(ip, t(60)).is_none());
    }

    #[test]
    fn an_address_change_closes_the_old_one() {
        let (old, new): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let mut tl = IpTimeline::default();
        tl.update(pod("a", "pod-a"), &[old], t(10), None);
        tl.update(pod("a", "pod-a"), &[new], t(20), None);
        assert!(tl.holder(old, t(25)).is_none());
        assert!(tl.holder(old, t(15)).is_some());
        assert!(tl.holder(new, t(25)).is_some());
    }
}
