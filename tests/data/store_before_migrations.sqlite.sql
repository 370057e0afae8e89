BEGIN TRANSACTION;
CREATE TABLE replicas (
	owner VARCHAR(128) NOT NULL, 
	heartbeat_at VARCHAR(26) NOT NULL, 
	PRIMARY KEY (owner)
);
INSERT INTO "replicas" VALUES('replica-a','2026-11-30 09:35:14.058994');
INSERT INTO "replicas" VALUES('replica-b','2026-11-30 09:35:14.064372');
CREATE TABLE saga_steps (
	request_id VARCHAR(300) NOT NULL, 
	idx INTEGER NOT NULL, 
	name VARCHAR(128) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	attempts INTEGER NOT NULL, 
	started_at VARCHAR(26) NOT NULL, 
	finished_at VARCHAR(26), 
	error TEXT NOT NULL, 
	data TEXT, 
	PRIMARY KEY (request_id, idx)
);
INSERT INTO "saga_steps" VALUES('SyncBooking/shared-1',0,'create_order','DONE',1,'2026-11-30 09:35:13.927880','2026-11-30 09:35:13.928243','','{"order_id": "o-1"}');
INSERT INTO "saga_steps" VALUES('SyncBooking/shared-1',1,'create_payment','DONE',1,'2026-11-30 09:35:13.928243','2026-11-30 09:35:13.933858','','{"order_id": "o-1", "payment_id": "p-1"}');
INSERT INTO "saga_steps" VALUES('AsyncBooking/shared-1',0,'create_order','DONE',1,'2026-11-30 09:35:13.945017','2026-11-30 09:35:13.950388','','{"order_id": "o-1"}');
INSERT INTO "saga_steps" VALUES('AsyncBooking/shared-1',1,'create_payment','DONE',1,'2026-11-30 09:35:13.950388','2026-11-30 09:35:13.955752','','{"order_id": "o-1", "payment_id": "p-1"}');
INSERT INTO "saga_steps" VALUES('SyncBooking/compensated-1',0,'create_order','DONE',1,'2026-11-30 09:35:13.961379','2026-11-30 09:35:13.966920','','{"order_id": "o-1"}');
INSERT INTO "saga_steps" VALUES('SyncBooking/compensated-1',1,'create_payment','FAILED',1,'2026-11-30 09:35:13.966920','2026-11-30 09:35:13.972387','payment declined: insufficient funds','{"order_id": "o-1"}');
INSERT INTO "saga_steps" VALUES('SyncBooking/running-1',0,'create_order','DONE',1,'2026-11-30 09:35:13.983122','2026-11-30 09:35:13.988524','','{"order_id": "o-1"}');
INSERT INTO "saga_steps" VALUES('SyncBooking/running-1',1,'create_payment','RUNNING',2,'2026-11-30 09:35:13.993943',NULL,'',NULL);
INSERT INTO "saga_steps" VALUES('SyncBooking/order/42',0,'create_order','DONE',1,'2026-11-30 09:35:13.999580','2026-11-30 09:35:14.005028','','{"order_id": "o-1"}');
INSERT INTO "saga_steps" VALUES('AsyncBooking/SyncBooking/x',0,'create_order','RUNNING',1,'2026-11-30 09:35:14.010489',NULL,'',NULL);
INSERT INTO "saga_steps" VALUES('AsyncBooking/compensating-1',0,'create_order','DONE',1,'2026-11-30 09:35:14.015990','2026-11-30 09:35:14.021323','','{"order_id": "o-1"}');
INSERT INTO "saga_steps" VALUES('AsyncBooking/compensating-1',1,'create_payment','FAILED',2,'2026-11-30 09:35:14.026753','2026-11-30 09:35:14.032122','payment service unavailable','{"order_id": "o-1"}');
INSERT INTO "saga_steps" VALUES('AsyncBooking/compensation-failed-1',0,'create_order','FAILED',1,'2026-11-30 09:35:14.037639','2026-11-30 09:35:14.042973','order service said no','{}');
INSERT INTO "saga_steps" VALUES('unscoped-1',0,'create_order','RUNNING',1,'2026-11-30 09:35:14.053696',NULL,'',NULL);
CREATE TABLE sagas (
	request_id VARCHAR(300) NOT NULL, 
	facade VARCHAR(128) NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	state VARCHAR(32) NOT NULL, 
	payload TEXT NOT NULL, 
	payload_hash VARCHAR(128) NOT NULL, 
	data TEXT NOT NULL, 
	data_at VARCHAR(26), 
	owner VARCHAR(128) NOT NULL, 
	error_code VARCHAR(128) NOT NULL, 
	error_reason TEXT NOT NULL, 
	created_at VARCHAR(26) NOT NULL, 
	updated_at VARCHAR(26) NOT NULL, 
	PRIMARY KEY (request_id)
);
INSERT INTO "sagas" VALUES('SyncBooking/shared-1','SyncBooking','sync','COMPLETED','{"amount": 42, "request_id": "shared-1", "user": "u-1"}','af3f32ace1f998aafa28e018388da0f6bc82bb61032f3ac4950fb00b421d3bf4','{"order_id": "o-1", "payment_id": "p-1"}','2026-11-30 09:35:13.939481','replica-a','','','2026-11-30 09:35:13.927880','2026-11-30 09:35:13.939481');
INSERT INTO "sagas" VALUES('AsyncBooking/shared-1','AsyncBooking','async','COMPLETED','{"amount": 42, "request_id": "shared-1", "user": "u-1"}','dee74595688d491fde7fa05a698d0c6c6a76f56c2a44aa373ae660621c477e85','{"order_id": "o-1", "payment_id": "p-1"}','2026-11-30 09:35:13.955752','replica-a','','','2026-11-30 09:35:13.945017','2026-11-30 09:35:13.955752');
INSERT INTO "sagas" VALUES('SyncBooking/compensated-1','SyncBooking','sync','COMPENSATED','{"amount": 42, "request_id": "compensated-1", "user": "u-1"}','ec17441ffaea1683d4beb6810b23bfacf940e6c54f4dd288c6206116e8d588e2','{"order_id": "o-1"}','2026-11-30 09:35:13.972387','replica-a','FAILED_PRECONDITION','payment declined: insufficient funds','2026-11-30 09:35:13.961379','2026-11-30 09:35:13.977743');
INSERT INTO "sagas" VALUES('SyncBooking/running-1','SyncBooking','sync','RUNNING','{"amount": 42, "request_id": "running-1", "user": "u-1"}','7d2e2b370fa1826b6bdd604dd99dee5309950bd2dc9d45bb8896bd67af275c95','',NULL,'replica-b','','','2026-11-30 09:35:13.983122','2026-11-30 09:35:13.993943');
INSERT INTO "sagas" VALUES('SyncBooking/order/42','SyncBooking','sync','COMPLETED','{"amount": 42, "request_id": "order/42", "user": "u-1"}','e1731b32f99b54f503d06882a1957ad7a9a61dfdaaa12bf6b5e847e7cdc8ef4e','{"order_id": "o-1"}','2026-11-30 09:35:14.005028','replica-a','','','2026-11-30 09:35:13.999580','2026-11-30 09:35:14.005028');
INSERT INTO "sagas" VALUES('AsyncBooking/SyncBooking/x','AsyncBooking','async','RUNNING','{"amount": 42, "request_id": "SyncBooking/x", "user": "u-1"}','09b834ea6e5f4246769ce18904541791d7ca18ec5d6b44e98244271e434f25fa','',NULL,'replica-a','','','2026-11-30 09:35:14.010489','2026-11-30 09:35:14.010489');
INSERT INTO "sagas" VALUES('AsyncBooking/compensating-1','AsyncBooking','async','COMPENSATING','{"amount": 42, "request_id": "compensating-1", "user": "u-1"}','336330f1d9f49a3f3a00b173a5c08efe9403a9babe16b831f03dd23c150e4973','{"order_id": "o-1"}','2026-11-30 09:35:14.032122','replica-b','UNAVAILABLE','payment service unavailable','2026-11-30 09:35:14.015990','2026-11-30 09:35:14.032122');
INSERT INTO "sagas" VALUES('AsyncBooking/compensation-failed-1','AsyncBooking','async','COMPENSATION_FAILED','{"amount": 42, "request_id": "compensation-failed-1", "user": "u-1"}','51c14010a94cb2dcf666d8246bcd65db38ab464f4eb4e3358c47510bd9a16c7d','{}','2026-11-30 09:35:14.042973','replica-a','ABORTED','cancel failed','2026-11-30 09:35:14.037639','2026-11-30 09:35:14.048389');
INSERT INTO "sagas" VALUES('unscoped-1','SyncBooking','sync','RUNNING','{"amount": 42, "request_id": "unscoped-1", "user": "u-1"}','2a16cb6cac1cc45a7c9b22dc59e0f310c83e9f168ceb713b4b370b536d5431d3','',NULL,'replica-b','','','2026-11-30 09:35:14.053696','2026-11-30 09:35:14.053696');
CREATE INDEX ix_sagas_listing ON sagas (facade, state, created_at, request_id);
CREATE INDEX ix_sagas_running ON sagas (kind, owner) WHERE state = 'RUNNING';
CREATE INDEX ix_sagas_created ON sagas (created_at, request_id);
COMMIT;
