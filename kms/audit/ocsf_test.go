package audit

import (
	"testing"
	"time"
)

func TestMarshalOCSFGolden(t *testing.T) {
	for _, tc := range []struct {
		name string
		e    Entry
		want string
	}{
		{
			name: "node release denied",
			e: Entry{
				Version: EntryVersion, Index: 7, Time: time.Date(2026, 11, 22, 10, 0, 0, 123456789, time.UTC),
				Node: "node-1", Actor: Actor{Kind: ActorNode, ID: "worker-7"},
				Operation: "key.release", Tenant: "ministry", Keyring: "ministry/payroll", KeyVersion: 3,
				Decision: Deny, Reason: "pcr7 mismatch", EvidenceHashes: []string{"ab12"}, RequestID: "req-1",
			},
			want: `{"class_uid":6003,"class_name":"API Activity","category_uid":6,"category_name":"Application Activity",` +
				`"activity_id":2,"activity_name":"Read","type_uid":600302,"time":1795341600123,` +
				`"severity_id":3,"severity":"Medium","status_id":2,"status":"Failure","status_detail":"pcr7 mismatch",` +
				`"actor":{"user":{"name":"worker-7","type":"System","type_id":3}},` +
				`"api":{"operation":"key.release","service":{"name":"coffre"},"request":{"uid":"req-1"}},` +
				`"resources":[{"name":"ministry/payroll","type":"keyring","version":"3"}],` +
				`"metadata":{"product":{"name":"Coffre","vendor_name":"Coffre"},"version":"1.1.0","uid":"node-1/7","sequence":7,"log_name":"coffre-audit"},` +
				`"unmapped":{"node":"node-1","tenant":"ministry","evidence":["ab12"],"actor_kind":"node","entry_version":1}}`,
		},
		{
			name: "admin create allowed",
			e: Entry{
				Version: EntryVersion, Index: 0, Time: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC),
				Node: "node-2", Actor: Actor{Kind: ActorAdmin, ID: "CN=alice"},
				Operation: "admin.create_keyring", Keyring: "t/k", Decision: Allow,
			},
			want: `{"class_uid":6003,"class_name":"API Activity","category_uid":6,"category_name":"Application Activity",` +
				`"activity_id":1,"activity_name":"Create","type_uid":600301,"time":1767323045000,` +
				`"severity_id":1,"severity":"Informational","status_id":1,"status":"Success",` +
				`"actor":{"user":{"name":"CN=alice","type":"Admin","type_id":2}},` +
				`"api":{"operation":"admin.create_keyring","service":{"name":"coffre"}},` +
				`"resources":[{"name":"t/k","type":"keyring"}],` +
				`"metadata":{"product":{"name":"Coffre","vendor_name":"Coffre"},"version":"1.1.0","uid":"node-2/0","sequence":0,"log_name":"coffre-audit"},` +
				`"unmapped":{"node":"node-2","actor_kind":"admin","entry_version":1}}`,
		},
		{
			name: "system other",
			e: Entry{
				Version: EntryVersion, Index: 9, Time: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC),
				Node: "n", Actor: Actor{Kind: ActorSystem, ID: "coffred"},
				Operation: "system.startup", Decision: Allow,
			},
			want: `{"class_uid":6003,"class_name":"API Activity","category_uid":6,"category_name":"Application Activity",` +
				`"activity_id":99,"activity_name":"Other","type_uid":600399,"time":1767323045000,` +
				`"severity_id":1,"severity":"Informational","status_id":1,"status":"Success",` +
				`"actor":{"app_name":"coffre"},"api":{"operation":"system.startup","service":{"name":"coffre"}},` +
				`"metadata":{"product":{"name":"Coffre","vendor_name":"Coffre"},"version":"1.1.0","uid":"n/9","sequence":9,"log_name":"coffre-audit"},` +
				`"unmapped":{"node":"n","actor_kind":"system","entry_version":1}}`,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := MarshalOCSF(&tc.e, tc.e.Index)
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tc.want {
				t.Fatalf("got\n%s\nwant\n%s", got, tc.want)
			}
		})
	}
	if _, err := MarshalOCSF(&Entry{}, 0); err == nil {
		t.Error("invalid entry accepted")
	}
}

func TestOCSFActivity(t *testing.T) {
	for op, want := range map[string]int{
		"key.generate_data_key": 1, "admin.create_keyring": 1, "key.decrypt": 2, "key.release": 2,
		"admin.rotate_key": 3, "admin.delete_keyring": 4, "admin.destroy_version": 4, "x": 99, "": 99, "a.": 99,
	} {
		if got := ocsfActivity(op); got != want {
			t.Errorf("ocsfActivity(%q) = %d, want %d", op, got, want)
		}
	}
}
