--
-- PostgreSQL database dump
--


-- Dumped from database version 15.20 (Debian 15.20-0+deb12u1)
-- Dumped by pg_dump version 15.20 (Debian 15.20-0+deb12u1)

SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

SET default_tablespace = '';

SET default_table_access_method = heap;

--
-- Name: replicas; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.replicas (
    owner character varying(128) NOT NULL,
    heartbeat_at timestamp with time zone NOT NULL
);


--
-- Name: saga_steps; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.saga_steps (
    request_id character varying(300) NOT NULL,
    idx integer NOT NULL,
    name character varying(128) NOT NULL,
    state character varying(16) NOT NULL,
    attempts integer NOT NULL,
    started_at timestamp with time zone NOT NULL,
    finished_at timestamp with time zone,
    error text NOT NULL,
    data text
);


--
-- Name: sagas; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.sagas (
    request_id character varying(300) NOT NULL,
    facade character varying(128) NOT NULL,
    kind character varying(16) NOT NULL,
    state character varying(32) NOT NULL,
    payload text NOT NULL,
    payload_hash character varying(128) NOT NULL,
    data text NOT NULL,
    data_at timestamp with time zone,
    owner character varying(128) NOT NULL,
    error_code character varying(128) NOT NULL,
    error_reason text NOT NULL,
    created_at timestamp with time zone NOT NULL,
    updated_at timestamp with time zone NOT NULL
);


--
-- Data for Name: replicas; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.replicas VALUES ('replica-a', '2026-11-30 09:35:14.244114+00');
INSERT INTO public.replicas VALUES ('replica-b', '2026-11-30 09:35:14.247143+00');


--
-- Data for Name: saga_steps; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.saga_steps VALUES ('SyncBooking/shared-1', 0, 'create_order', 'DONE', 1, '2026-11-30 09:35:14.192946+00', '2026-11-30 09:35:14.211962+00', '', '{"order_id": "o-1"}');
INSERT INTO public.saga_steps VALUES ('SyncBooking/shared-1', 1, 'create_payment', 'DONE', 1, '2026-11-30 09:35:14.211962+00', '2026-11-30 09:35:14.214946+00', '', '{"order_id": "o-1", "payment_id": "p-1"}');
INSERT INTO public.saga_steps VALUES ('AsyncBooking/shared-1', 0, 'create_order', 'DONE', 1, '2026-11-30 09:35:14.219629+00', '2026-11-30 09:35:14.220972+00', '', '{"order_id": "o-1"}');
INSERT INTO public.saga_steps VALUES ('AsyncBooking/shared-1', 1, 'create_payment', 'DONE', 1, '2026-11-30 09:35:14.220972+00', '2026-11-30 09:35:14.222364+00', '', '{"order_id": "o-1", "payment_id": "p-1"}');
INSERT INTO public.saga_steps VALUES ('SyncBooking/compensated-1', 0, 'create_order', 'DONE', 1, '2026-11-30 09:35:14.223971+00', '2026-11-30 09:35:14.225197+00', '', '{"order_id": "o-1"}');
INSERT INTO public.saga_steps VALUES ('SyncBooking/compensated-1', 1, 'create_payment', 'FAILED', 1, '2026-11-30 09:35:14.225197+00', '2026-11-30 09:35:14.226335+00', 'payment declined: insufficient funds', '{"order_id": "o-1"}');
INSERT INTO public.saga_steps VALUES ('SyncBooking/running-1', 0, 'create_order', 'DONE', 1, '2026-11-30 09:35:14.229014+00', '2026-11-30 09:35:14.230191+00', '', '{"order_id": "o-1"}');
INSERT INTO public.saga_steps VALUES ('SyncBooking/running-1', 1, 'create_payment', 'RUNNING', 2, '2026-11-30 09:35:14.231173+00', NULL, '', NULL);
INSERT INTO public.saga_steps VALUES ('SyncBooking/order/42', 0, 'create_order', 'DONE', 1, '2026-11-30 09:35:14.232374+00', '2026-11-30 09:35:14.233645+00', '', '{"order_id": "o-1"}');
INSERT INTO public.saga_steps VALUES ('AsyncBooking/SyncBooking/x', 0, 'create_order', 'RUNNING', 1, '2026-11-30 09:35:14.234844+00', NULL, '', NULL);
INSERT INTO public.saga_steps VALUES ('AsyncBooking/compensating-1', 0, 'create_order', 'DONE', 1, '2026-11-30 09:35:14.236024+00', '2026-11-30 09:35:14.236962+00', '', '{"order_id": "o-1"}');
INSERT INTO public.saga_steps VALUES ('AsyncBooking/compensating-1', 1, 'create_payment', 'FAILED', 2, '2026-11-30 09:35:14.237965+00', '2026-11-30 09:35:14.238971+00', 'payment service unavailable', '{"order_id": "o-1"}');
INSERT INTO public.saga_steps VALUES ('AsyncBooking/compensation-failed-1', 0, 'create_order', 'FAILED', 1, '2026-11-30 09:35:14.240081+00', '2026-11-30 09:35:14.241077+00', 'order service said no', '{}');
INSERT INTO public.saga_steps VALUES ('unscoped-1', 0, 'create_order', 'RUNNING', 1, '2026-11-30 09:35:14.242908+00', NULL, '', NULL);


--
-- Data for Name: sagas; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.sagas VALUES ('SyncBooking/shared-1', 'SyncBooking', 'sync', 'COMPLETED', '{"amount": 42, "request_id": "shared-1", "user": "u-1"}', 'af3f32ace1f998aafa28e018388da0f6bc82bb61032f3ac4950fb00b421d3bf4', '{"order_id": "o-1", "payment_id": "p-1"}', '2026-11-30 09:35:14.218527+00', 'replica-a', '', '', '2026-11-30 09:35:14.192946+00', '2026-11-30 09:35:14.218527+00');
INSERT INTO public.sagas VALUES ('AsyncBooking/shared-1', 'AsyncBooking', 'async', 'COMPLETED', '{"amount": 42, "request_id": "shared-1", "user": "u-1"}', 'dee74595688d491fde7fa05a698d0c6c6a76f56c2a44aa373ae660621c477e85', '{"order_id": "o-1", "payment_id": "p-1"}', '2026-11-30 09:35:14.222364+00', 'replica-a', '', '', '2026-11-30 09:35:14.219629+00', '2026-11-30 09:35:14.222364+00');
INSERT INTO public.sagas VALUES ('SyncBooking/compensated-1', 'SyncBooking', 'sync', 'COMPENSATED', '{"amount": 42, "request_id": "compensated-1", "user": "u-1"}', 'ec17441ffaea1683d4beb6810b23bfacf940e6c54f4dd288c6206116e8d588e2', '{"order_id": "o-1"}', '2026-11-30 09:35:14.226335+00', 'replica-a', 'FAILED_PRECONDITION', 'payment declined: insufficient funds', '2026-11-30 09:35:14.223971+00', '2026-11-30 09:35:14.227841+00');
INSERT INTO public.sagas VALUES ('SyncBooking/running-1', 'SyncBooking', 'sync', 'RUNNING', '{"amount": 42, "request_id": "running-1", "user": "u-1"}', '7d2e2b370fa1826b6bdd604dd99dee5309950bd2dc9d45bb8896bd67af275c95', '', NULL, 'replica-b', '', '', '2026-11-30 09:35:14.229014+00', '2026-11-30 09:35:14.231173+00');
INSERT INTO public.sagas VALUES ('SyncBooking/order/42', 'SyncBooking', 'sync', 'COMPLETED', '{"amount": 42, "request_id": "order/42", "user": "u-1"}', 'e1731b32f99b54f503d06882a1957ad7a9a61dfdaaa12bf6b5e847e7cdc8ef4e', '{"order_id": "o-1"}', '2026-11-30 09:35:14.233645+00', 'replica-a', '', '', '2026-11-30 09:35:14.232374+00', '2026-11-30 09:35:14.233645+00');
INSERT INTO public.sagas VALUES ('AsyncBooking/SyncBooking/x', 'AsyncBooking', 'async', 'RUNNING', '{"amount": 42, "request_id": "SyncBooking/x", "user": "u-1"}', '09b834ea6e5f4246769ce18904541791d7ca18ec5d6b44e98244271e434f25fa', '', NULL, 'replica-a', '', '', '2026-11-30 09:35:14.234844+00', '2026-11-30 09:35:14.234844+00');
INSERT INTO public.sagas VALUES ('AsyncBooking/compensating-1', 'AsyncBooking', 'async', 'COMPENSATING', '{"amount": 42, "request_id": "compensating-1", "user": "u-1"}', '336330f1d9f49a3f3a00b173a5c08efe9403a9babe16b831f03dd23c150e4973', '{"order_id": "o-1"}', '2026-11-30 09:35:14.238971+00', 'replica-b', 'UNAVAILABLE', 'payment service unavailable', '2026-11-30 09:35:14.236024+00', '2026-11-30 09:35:14.238971+00');
INSERT INTO public.sagas VALUES ('AsyncBooking/compensation-failed-1', 'AsyncBooking', 'async', 'COMPENSATION_FAILED', '{"amount": 42, "request_id": "compensation-failed-1", "user": "u-1"}', '51c14010a94cb2dcf666d8246bcd65db38ab464f4eb4e3358c47510bd9a16c7d', '{}', '2026-11-30 09:35:14.241077+00', 'replica-a', 'ABORTED', 'cancel failed', '2026-11-30 09:35:14.240081+00', '2026-11-30 09:35:14.242071+00');
INSERT INTO public.sagas VALUES ('unscoped-1', 'SyncBooking', 'sync', 'RUNNING', '{"amount": 42, "request_id": "unscoped-1", "user": "u-1"}', '2a16cb6cac1cc45a7c9b22dc59e0f310c83e9f168ceb713b4b370b536d5431d3', '', NULL, 'replica-b', '', '', '2026-11-30 09:35:14.242908+00', '2026-11-30 09:35:14.242908+00');


--
-- Name: replicas replicas_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.replicas
    ADD CONSTRAINT replicas_pkey PRIMARY KEY (owner);


--
-- Name: saga_steps saga_steps_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.saga_steps
    ADD CONSTRAINT saga_steps_pkey PRIMARY KEY (request_id, idx);


--
-- Name: sagas sagas_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.sagas
    ADD CONSTRAINT sagas_pkey PRIMARY KEY (request_id);


--
-- Name: ix_sagas_created; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_sagas_created ON public.sagas USING btree (created_at, request_id);


--
-- Name: ix_sagas_listing; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_sagas_listing ON public.sagas USING btree (facade, state, created_at, request_id);


--
-- Name: ix_sagas_running; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX ix_sagas_running ON public.sagas USING btree (kind, owner) WHERE ((state)::text = 'RUNNING'::text);


--
-- PostgreSQL database dump complete
--


